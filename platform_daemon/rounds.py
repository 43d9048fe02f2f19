"""Rounds of request handling on the platform: snapshot, per-batch selection, completion.

A high-priority round starts with the first GetRequest the agent sends while no round is
open. The pending word is snapshotted then and only those types are served; work that
becomes pending during the round waits for the next one, so a type that keeps re-arming
itself cannot starve the others. Within a round, types are served in turns, one batch each,
and each type gets at most ``max_batches`` batches, so every round ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from shared.constants import HIGH_PRIORITY_SERVICES, PageState, PageStatus, Priority, ServiceType
from shared.errors import ErrorCode, RemoteProtocolError
from shared.layout import SlotState
from shared.messages import NO_SLOT, CompleteRequest, GetRequest, Request

if TYPE_CHECKING:
    from .services.base import PlatformService
    from .vm import VM


@dataclass
class IssuedBatch:
    """The daemon's own record of a slot it handed out (the slot memory is not trusted)."""

    service: ServiceType
    seq: int
    bpns: npt.NDArray[np.int64]
    mpns: npt.NDArray[np.int64]
    select_seconds: float


@dataclass
class RoundState:
    """Per-VM bookkeeping of the current round and issued slots."""

    open: bool = False
    snapshot: list[ServiceType] = field(default_factory=list)
    batches: dict[ServiceType, int] = field(default_factory=dict)
    turn: int = 0
    issued: dict[int, IssuedBatch] = field(default_factory=dict)
    next_seq: int = 1
    rounds: int = 0


class RoundEngine:
    """Serves GetRequest and CompleteRequest for every VM."""

    def __init__(
        self,
        services: dict[ServiceType, PlatformService],
        max_batches: int = 8,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.services = services
        self.max_batches = max_batches
        self.clock = clock
        # Called as (service, seconds, status) after each completed batch.
        self.on_batch_done: Callable[[ServiceType, float, npt.NDArray[np.uint8]], None] = (
            lambda service, seconds, status: None
        )
        self.on_round_open: Callable[[Priority], None] = lambda priority: None

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
        if msg.priority != Priority.HIGH:
            return Request(0, NO_SLOT, 0, 0)  # low-priority services: not in this version
        if not state.open:
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
        self.refresh_pending(vm)
        return Request(0, NO_SLOT, 0, 0)

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
    ) -> Request:
        seq = state.next_seq
        state.next_seq += 1
        vm.p2m.state[bpns] = PageState.SELECTED
        vm.region.slot(slot_index).fill(stype, seq, bpns, mpns)
        state.issued[slot_index] = IssuedBatch(stype, seq, bpns, mpns, seconds)
        return Request(int(stype), slot_index, len(bpns), seq)

    def complete(self, vm: VM, state: RoundState, msg: CompleteRequest) -> None:
        """Read the VMM's verdicts, hand accepted pages to the service, free the slot."""
        batch = state.issued.get(msg.slot)
        if batch is None or batch.seq != msg.seq or len(batch.bpns) != msg.count:
            raise RemoteProtocolError(
                f"CompleteRequest for slot {msg.slot} seq {msg.seq} that was not issued",
                ErrorCode.SLOT_NOT_ISSUED,
            )
        t0 = self.clock()
        slot = vm.region.slot(msg.slot)
        try:
            bpn_view, status_view, _ = slot.batch(msg.count)
        except Exception as exc:  # LayoutError: corrupt status bytes from the peer
            raise RemoteProtocolError(str(exc), ErrorCode.BAD_BODY) from None
        if not np.array_equal(bpn_view, batch.bpns.astype(np.uint64)):
            raise RemoteProtocolError(
                f"slot {msg.slot}: BPN list changed by the VMM", ErrorCode.BAD_BODY
            )
        del state.issued[msg.slot]
        status = status_view.copy()
        # A page that faulted while SELECTED is exposed again: the VMM kept it.
        still_selected = vm.p2m.state[batch.bpns] == PageState.SELECTED
        status[(status == PageStatus.OK) & ~still_selected] = PageStatus.NOT_EXPOSED
        ok = status == PageStatus.OK
        accepted, refused = batch.bpns[ok], batch.bpns[~ok]
        vm.p2m.state[batch.bpns[~ok & still_selected]] = PageState.EXPOSED
        svc = self.services[batch.service]
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
        status_view[:] = status
        slot.write_header(batch.service, SlotState.FREE, msg.count, msg.seq)
        self.on_batch_done(batch.service, batch.select_seconds + self.clock() - t0, status)
