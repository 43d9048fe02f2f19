"""Rounds of request handling on the platform: snapshot, per-batch selection, completion.

Both priorities share these rules. A round starts with the agent's first GetRequest (flag
NEW_ROUND, or any GetRequest while no round of that priority is open). The pending word is
snapshotted then and only those types are served; work that becomes pending during the
round waits for the next one, so a type that keeps re-arming itself cannot starve the
others. Pages are selected per batch, when the GetRequest arrives.

- **High priority** (release services): types take turns, one batch each, at most
  ``max_batches`` per type, so every round ends.
- **Low priority** (best effort): each GetRequest carries the time left in the agent's
  bound; the scheduler (``lowprio.py``) picks the type by class with aging and the batch
  size from the type's measured cost, so the batch fits. A low-priority round yields to
  high priority (see ``_high_pending``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from shared.constants import (
    HIGH_PRIORITY_MASK,
    HIGH_PRIORITY_SERVICES,
    PageState,
    PageStatus,
    Priority,
    ServiceType,
)
from shared.distinct import has_repeats
from shared.errors import ErrorCode, RemoteProtocolError
from shared.layout import SlotState
from shared.messages import (
    NO_SLOT,
    REQUEST_FLAG_LAST,
    CompleteRequest,
    GetRequest,
    Request,
)
from shared.schedstat import RunDelay

from .lowprio import LowPriorityScheduler, RoundEnd, VMSchedule
from .services.base import LowPriorityService

if TYPE_CHECKING:
    from .services.base import PlatformService
    from .vm import VM

_ROUND_OVER = Request(0, NO_SLOT, 0, 0)


@dataclass
class IssuedBatch:
    """The daemon's own record of a slot it handed out (the slot memory is not trusted)."""

    service: ServiceType
    seq: int
    bpns: npt.NDArray[np.int64]
    mpns: npt.NDArray[np.int64]
    select_seconds: float
    priority: Priority = Priority.HIGH
    units: int = 0
    issued_at: float = 0.0
    first: bool = False  # a low round's first batch, asked for while the guest ran
    #: A low batch's entry in ``RoundState.low_trace``, filled in at completion.
    trace: dict[str, float | int | str | bool] | None = None


#: Low-priority batches whose timings each VM keeps (``lowprio_trace`` ctl op), to split a
#: round's overrun into its parts (``benchmarks/lowprio.py`` reads it every 3 s: at 10
#: rounds a second, a few batches each, 512 is ample; about 0.6 MB per VM).
LOW_TRACE_KEPT = 512


@dataclass
class RoundState:
    """Per-VM bookkeeping of the current rounds and issued slots."""

    open: bool = False
    snapshot: list[ServiceType] = field(default_factory=list)
    batches: dict[ServiceType, int] = field(default_factory=dict)
    turn: int = 0
    issued: dict[int, IssuedBatch] = field(default_factory=dict)
    next_seq: int = 1
    rounds: int = 0
    low: VMSchedule = field(default_factory=VMSchedule)
    #: High-priority bits still set when the last high round closed: work a round was
    #: offered and could not finish (every page refused, a target out of reach).
    high_attended: int = 0
    #: The last low-priority batches: what was predicted and measured, and when each side
    #: handled them (the daemon's clock is CLOCK_MONOTONIC, as the agent's).
    low_trace: deque[dict[str, float | int | str | bool]] = field(
        default_factory=lambda: deque(maxlen=LOW_TRACE_KEPT)
    )


def _mismatch(msg: CompleteRequest, batch: IssuedBatch | None) -> str:
    """What is wrong with a CompleteRequest that does not match its slot's batch."""
    head = f"CompleteRequest{{slot {msg.slot}, count {msg.count}, seq {msg.seq}}}"
    if batch is None:
        return f"{head}: no batch is issued in slot {msg.slot}"
    if batch.seq != msg.seq:
        return f"{head}: the batch issued in slot {msg.slot} has seq {batch.seq}"
    return f"{head}: the batch issued in slot {msg.slot} has count {len(batch.bpns)}"


def _agent_pages(
    vm: VM, msg: CompleteRequest, bpns: npt.NDArray[np.uint64], status: npt.NDArray[np.uint8]
) -> npt.NDArray[np.int64]:
    """The pages an agent-filled batch gives: distinct guest pages, each with status OK."""
    if len(bpns) and int(bpns.max()) >= vm.guest_pages:
        raise RemoteProtocolError(
            f"slot {msg.slot}: BPN {int(bpns.max())} out of range 0..{vm.guest_pages - 1}",
            ErrorCode.BPN_OUT_OF_RANGE,
        )
    pages = bpns.astype(np.int64)
    if has_repeats(pages):
        raise RemoteProtocolError(f"slot {msg.slot}: a page is listed twice", ErrorCode.BAD_BODY)
    if np.any(status != PageStatus.OK):
        raise RemoteProtocolError(
            f"slot {msg.slot}: an agent-filled batch lists only pages it gives (status OK)",
            ErrorCode.BAD_BODY,
        )
    return pages


@dataclass
class LowRoundClosed:
    """What ``on_low_round_closed`` reports: why, and the pages deferred per type."""

    end: RoundEnd
    deferred: dict[ServiceType, int]


class RoundEngine:
    """Serves GetRequest and CompleteRequest for every VM."""

    def __init__(
        self,
        services: dict[ServiceType, PlatformService],
        max_batches: int = 8,
        clock: Callable[[], float] = time.perf_counter,
        scheduler: LowPriorityScheduler | None = None,
    ) -> None:
        self.services = services
        self.max_batches = max_batches
        self.clock = clock
        self.scheduler = scheduler or LowPriorityScheduler()
        self._run_delay = RunDelay()  # for the low batch trace: the loop thread's CPU wait
        self.low_services = {
            s: svc for s, svc in services.items() if isinstance(svc, LowPriorityService)
        }
        # Called as (service, seconds, status) after each completed batch.
        self.on_batch_done: Callable[[ServiceType, float, npt.NDArray[np.uint8]], None] = (
            lambda service, seconds, status: None
        )
        self.on_round_open: Callable[[Priority], None] = lambda priority: None
        self.on_low_round_closed: Callable[[VM, LowRoundClosed], None] = lambda vm, closed: None
        # Called as (service, pages of work, seconds) for each low-priority batch or scan.
        self.on_low_work: Callable[[ServiceType, int, float], None] = lambda s, n, t: None

    def refresh_pending(self, vm: VM) -> int:
        """Recompute the pending word from the services' queues; returns the new word."""
        word = 0
        for stype, svc in self.services.items():
            if svc.has_work(vm):
                word |= stype.bit
        vm.region.pending = word
        return word

    def get_request(self, vm: VM, state: RoundState, msg: GetRequest) -> Request:
        """Open a round if needed and hand out the next batch, or end the round."""
        if msg.priority == Priority.LOW:
            return self._get_low(vm, state, msg, self.clock())
        if not state.open or msg.new_round:
            word = self.refresh_pending(vm)
            state.open, state.turn, state.rounds = True, 0, state.rounds + 1
            self.on_round_open(msg.priority)
            state.snapshot = [
                s for s in HIGH_PRIORITY_SERVICES if word & s.bit and s in self.services
            ]
            state.batches = {s: 0 for s in state.snapshot}
        while state.snapshot:
            stype = state.snapshot[state.turn % len(state.snapshot)]
            svc = self.services[stype]
            if state.batches[stype] >= self.max_batches or not svc.has_work(vm):
                state.snapshot.remove(stype)
                continue
            slot_index = self._free_slot(vm, state)
            if slot_index is None:
                break
            t0 = self.clock()
            bpns, mpns = svc.select(vm, vm.region.slot_capacity)
            if len(bpns) == 0:
                state.snapshot.remove(stype)
                continue
            state.batches[stype] += 1
            state.turn += 1
            return self._issue(vm, state, stype, slot_index, bpns, mpns, self.clock() - t0)
        state.open = False
        state.high_attended = self.refresh_pending(vm) & HIGH_PRIORITY_MASK
        return _ROUND_OVER

    # ---- low priority ---------------------------------------------------------------------

    def _get_low(self, vm: VM, state: RoundState, msg: GetRequest, received: float) -> Request:
        sched, low = self.scheduler, state.low
        cpu0, wait0 = time.thread_time(), self._run_delay.seconds()
        if msg.new_round or not low.open:
            if low.open:  # the agent ended the last round itself (its bound, or high priority)
                self._close_low(vm, state, RoundEnd.LEFT, received)
            word = self.refresh_pending(vm)
            sched.open_round(low, self.clock(), [s for s in self.low_services if word & s.bit])
            self.on_round_open(Priority.LOW)
        if self._high_pending(vm, state):
            return self._close_low(vm, state, RoundEnd.PREEMPTED, received)
        # A round's first request is asked for while the guest runs, and the bound starts
        # when its batch reaches the agent: the whole budget is for the batch's work. A later
        # request came on the guest's time, and its batch goes back on it: two ways less.
        first = msg.new_round
        budget = msg.budget_us / 1e6
        if not first:
            budget -= 2 * low.exchange
        while True:
            now = self.clock()
            work = self._low_work(vm, low, now)
            time_left = budget if first else budget - (now - received)
            # A probe (a type priced out of every batch, measured again) only opens a round.
            choice = sched.choose(low, now, time_left, work, probe=first)
            if isinstance(choice, RoundEnd):
                return self._close_low(vm, state, choice, received, work)
            slot_index = self._free_slot(vm, state)
            if slot_index is None or self._low_batch_out(state):
                # One low-priority batch out at a time: a verdict that reaches a page only
                # after another batch selected it would be applied to that batch's page
                # (remap validation has no epochs). The agent completes each batch before it
                # asks for the next (tests/test_lowprio_one_batch_out.py); a peer that does
                # not is given no more, and only its own guest could suffer otherwise.
                return self._close_low(vm, state, RoundEnd.NO_SLOT, received, work)
            svc = self.low_services[choice.service]
            sel = svc.select_work(vm, vm.region.slot_capacity, choice.units, now)
            seconds = self.clock() - now
            if len(sel.bpns) == 0:
                # Every candidate popped was stale (the guest changed or released the page
                # meanwhile); a type that did nothing at all leaves the snapshot.
                if sel.work == 0:
                    low.snapshot.remove(choice.service)
                continue
            sched.served(low, choice.service, len(sel.bpns), now)
            req = self._issue(
                vm,
                state,
                choice.service,
                slot_index,
                sel.bpns,
                sel.mpns,
                seconds,
                Priority.LOW,
                sel.work,
                first,
            )
            # When nothing could follow this batch in the time left (a later batch needs its
            # two ways too), say so: the agent then does not spend a round trip to hear that
            # the round is over.
            after = self.clock()
            predicted = low.cost(choice.service).estimate(sel.work)
            left = time_left - predicted - 2 * low.exchange
            if not first:
                left -= after - now
            work = self._low_work(vm, low, after)
            end = sched.choose(low, after, left, work, probe=False)
            if isinstance(end, RoundEnd):
                self._close_low(vm, state, end, received, work)
                req = replace(req, flags=REQUEST_FLAG_LAST)
            self._trace_issue(state, req, sel.work, first, (time_left, predicted))
            state.low_trace[-1].update(
                get_start=received,
                get_end=self.clock(),
                get_cpu=time.thread_time() - cpu0,
                get_wait=self._run_delay.seconds() - wait0,
                run_delay_start=wait0,  # the thread's total so far
            )
            return req

    def _trace_issue(
        self,
        state: RoundState,
        req: Request,
        units: int,
        first: bool,
        sized: tuple[float, float],
    ) -> None:
        """Start the trace entry of a low batch just issued (completed in ``complete``);
        ``sized``: the time left it was sized for and its predicted work."""
        service = ServiceType(req.service)
        time_left, predicted = sized
        cost = state.low.cost(service)
        entry: dict[str, float | int | str | bool] = {
            "seq": req.seq,
            "service": service.name.lower(),
            "units": units,
            "pages": req.count,
            "first": first,
            "last": req.last,
            "time_left": time_left,
            "predicted": predicted,
            "cost_samples": cost.samples,
            "exchange": state.low.exchange,
        }
        state.low_trace.append(entry)
        batch = state.issued[req.slot]
        batch.trace = entry

    def _high_pending(self, vm: VM, state: RoundState) -> bool:
        """High priority pre-empts low: while a high round runs, and while high-priority work
        is pending that no high round has been offered since it appeared. Work a high round
        left pending (it could not make progress) does not stop low-priority work: neither
        class can starve the other."""
        if state.open:
            return True
        word = 0
        for s in HIGH_PRIORITY_SERVICES:
            if s in self.services and self.services[s].has_work(vm):
                word |= s.bit
        return bool(word & ~state.high_attended)

    def _low_work(self, vm: VM, low: VMSchedule, now: float) -> dict[ServiceType, int]:
        return {s: self.low_services[s].pending_work(vm, now) for s in low.snapshot}

    def _close_low(
        self,
        vm: VM,
        state: RoundState,
        end: RoundEnd,
        received: float,
        work: dict[ServiceType, int] | None = None,
    ) -> Request:
        """End the low round; the answer's ``count`` is the daemon's own time on this
        GetRequest in µs, so the agent can tell a round trip from the scans done in it."""
        now = self.clock()
        if work is None:
            work = self._low_work(vm, state.low, now)
        deferred = self.scheduler.close_round(state.low, end, work)
        self.on_low_round_closed(vm, LowRoundClosed(end, deferred))
        return Request(0, NO_SLOT, min(0xFFFFFFFF, round((now - received) * 1e6)), 0)

    # ---- both -----------------------------------------------------------------------------

    @staticmethod
    def _low_batch_out(state: RoundState) -> bool:
        return any(b.priority == Priority.LOW for b in state.issued.values())

    def _free_slot(self, vm: VM, state: RoundState) -> int | None:
        for i in range(vm.region.slot_count):
            if i not in state.issued:
                return i
        return None

    def _issue(
        self,
        vm: VM,
        state: RoundState,
        stype: ServiceType,
        slot_index: int,
        bpns: npt.NDArray[np.int64],
        mpns: npt.NDArray[np.int64],
        seconds: float,
        priority: Priority = Priority.HIGH,
        units: int = 0,
        first: bool = False,
    ) -> Request:
        seq = state.next_seq
        state.next_seq += 1
        svc = self.services[stype]
        if svc.takes_pages:
            vm.p2m.state[bpns] = PageState.SELECTED
        vm.region.slot(slot_index).fill(stype, seq, bpns, mpns, svc.issue_marks(vm, bpns))
        state.issued[slot_index] = IssuedBatch(
            stype, seq, bpns, mpns, seconds, priority, units, self.clock(), first
        )
        return Request(int(stype), slot_index, len(bpns), seq)

    def complete(self, vm: VM, state: RoundState, msg: CompleteRequest) -> None:
        """Read the VMM's verdicts, hand accepted pages to the service, free the slot."""
        batch = state.issued.get(msg.slot)
        svc = self.services[batch.service] if batch is not None else None
        # An agent-filled batch (the balloon) comes back with the pages the agent chose: at
        # most as many as the slot offered room for.
        fills = svc is not None and svc.agent_fills
        if (
            batch is None
            or batch.seq != msg.seq
            or (msg.count > len(batch.bpns) if fills else msg.count != len(batch.bpns))
        ):
            raise RemoteProtocolError(_mismatch(msg, batch), ErrorCode.SLOT_NOT_ISSUED)
        assert svc is not None
        t0 = self.clock()
        cpu0 = time.thread_time()
        slot = vm.region.slot(msg.slot)
        try:
            bpn_view, status_view, _ = slot.batch(msg.count)
        except Exception as exc:  # LayoutError: corrupt status bytes from the peer
            raise RemoteProtocolError(str(exc), ErrorCode.BAD_BODY) from None
        if fills:
            batch = replace(batch, bpns=_agent_pages(vm, msg, bpn_view, status_view))
        elif not np.array_equal(bpn_view, batch.bpns.astype(np.uint64)):
            raise RemoteProtocolError(
                f"slot {msg.slot}: BPN list changed by the VMM", ErrorCode.BAD_BODY
            )
        del state.issued[msg.slot]
        status = status_view.copy()
        if svc.takes_pages:
            self._hand_over(vm, svc, batch, status)
        else:
            svc.complete(vm, batch.bpns, status)
        status_view[:] = status
        slot.write_header(batch.service, SlotState.FREE, msg.count, msg.seq)
        end = self.clock()
        self.on_batch_done(batch.service, batch.select_seconds + end - t0, status)
        if batch.priority == Priority.LOW:
            processing = batch.select_seconds + (end - t0) + msg.elapsed_us / 1e6
            # What a later batch adds to the agent's round beyond the work: the Request's way
            # to the agent (its CompleteRequest has no answer to wait for), half the round
            # trip. A first batch's way overlapped the guest's own time: not measured.
            round_trip = max(0.0, (t0 - batch.issued_at) - msg.elapsed_us / 1e6)
            exchange = None if batch.first else round_trip / 2
            self.scheduler.record(state.low, batch.service, batch.units, processing, exchange)
            if batch.trace is not None:
                batch.trace.update(
                    complete_start=t0,
                    complete_end=end,
                    complete_cpu=time.thread_time() - cpu0,
                    agent_seconds=msg.elapsed_us / 1e6,
                    select_seconds=batch.select_seconds,
                    processing=processing,
                )
            self.on_low_work(batch.service, batch.units, processing)

    def _hand_over(
        self, vm: VM, svc: PlatformService, batch: IssuedBatch, status: npt.NDArray[np.uint8]
    ) -> None:
        """Accepted pages go in flight to the service; refused ones are exposed again, but
        for those the VMM says it does not map: they are the platform's (RESIDENT)."""
        # A page that faulted while SELECTED is exposed again: the VMM kept it.
        still_selected = vm.p2m.state[batch.bpns] == PageState.SELECTED
        # Why the VMM's NOT_EXPOSED is believed: a fault's reply reaches it before the
        # Request of any later round (one socket, in order), so it knows every mapping the
        # daemon gave. The daemon can think a page exposed that is not: one whose release
        # the VMM had accepted when a crashed daemon's successor took it over. Exposed
        # again, such a page would be offered and refused for ever, never reclaimed.
        unmapped = (status == PageStatus.NOT_EXPOSED) & still_selected
        status[(status == PageStatus.OK) & ~still_selected] = PageStatus.NOT_EXPOSED
        ok = status == PageStatus.OK
        accepted, refused = batch.bpns[ok], batch.bpns[~ok]
        vm.p2m.state[batch.bpns[~ok & still_selected & ~unmapped]] = PageState.EXPOSED
        vm.p2m.state[batch.bpns[unmapped]] = PageState.RESIDENT
        if len(refused):
            # Pages that faulted while selected are reported too (NOT_EXPOSED): they are
            # exposed again like the refused ones, and a service may hold bookkeeping for
            # them (p2mUpdate counts the stale mappings that pin an old frame).
            svc.on_refused(vm, refused, status[~ok])
        outcome = status[ok]
        if len(accepted):
            svc.mark_in_flight(vm, accepted)
            svc.complete(vm, accepted, outcome)
            status[ok] = outcome
