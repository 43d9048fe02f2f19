"""The interface every platform-side service implements (the talk's callback table).

A service selects the pages of one batch when the agent asks (never all up front), starts its
work on the pages the VMM accepted when the batch completes, and resolves faults on its own
in-flight pages, because only it knows why a page is being processed.

Services see a ``ServiceContext`` (machine memory, allocator, shared frames, clock, metrics),
never the server. High-priority services (release operations) are served in rounds driven by
the pending word; low-priority services also say how much work waits and are scheduled by
class and cost within a round's time bound (``platform_daemon/lowprio.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from shared.constants import PageState, PageStatus, Priority, ServiceType
from shared.messages import FaultReply

from ..hugepages import split
from ..p2m import NO_OP

if TYPE_CHECKING:
    from ..context import ServiceContext
    from ..vm import VM

Pages = npt.NDArray[np.int64]
_EMPTY = np.empty(0, dtype=np.int64)
_EMPTY.flags.writeable = False


class PlatformService(ABC):
    """One memory service on the platform side."""

    service: ServiceType
    priority: Priority = Priority.HIGH
    #: Does a completed batch take the accepted pages from the VMM (SELECTED, then
    #: IN_FLIGHT with this service as op)? Sampling's batches only inform the monitor.
    takes_pages: bool = True
    #: Does the agent fill the batch (the balloon: the guest picks its pages)? Then the slot
    #: is handed out empty with room for the pages wanted, the agent writes the BPNs it gives
    #: and completes with their count, and ``complete`` gets those pages.
    agent_fills: bool = False

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def has_work(self, vm: VM) -> bool:
        """True while this service wants batches from ``vm`` (keeps its pending bit set)."""

    @abstractmethod
    def select(self, vm: VM, capacity: int) -> tuple[Pages, npt.NDArray[np.int64]]:
        """BPNs of the next batch (at most ``capacity``) and the MPNs the VMM should map."""

    @abstractmethod
    def complete(self, vm: VM, accepted: Pages, status: npt.NDArray[np.uint8]) -> None:
        """Start work on ``accepted`` (now IN_FLIGHT, not exposed); write outcomes to status."""

    def on_fault(self, vm: VM, bpn: int, write: bool) -> FaultReply | Any:
        """Resolve a fault on an in-flight page of this service (a reply or an awaitable)."""
        raise NotImplementedError(f"{self.service.name} has no pages in flight")

    def on_refused(self, vm: VM, refused: Pages, status: npt.NDArray[np.uint8]) -> None:  # noqa: B027
        """Hook: the VMM refused these pages (they are EXPOSED again)."""

    def on_vm_gone(self, vm: VM) -> None:  # noqa: B027
        """Hook: drop any per-VM queue."""

    def mark_in_flight(self, vm: VM, bpns: Pages) -> None:
        """Pages leave the VMM and belong to this service until it finishes or cancels.

        A page of a large region ends that region's large mapping first (the VMM split it
        too when it released the page): ``hugepages.py``.
        """
        self.split_large(vm, bpns)
        p2m = vm.p2m
        p2m.state[bpns] = PageState.IN_FLIGHT
        p2m.op[bpns] = self.service
        p2m.epoch[bpns] += 1

    def issue_marks(self, vm: VM, bpns: Pages) -> npt.NDArray[np.uint8] | None:
        """The status bytes a batch of ``bpns`` goes out with (None: all OK); read at issue
        time, so they say what the p2m says when the VMM gets the batch."""
        return None

    def split_large(self, vm: VM, bpns: Pages) -> int:
        """Split the large regions ``bpns`` touch, counted under this service's name."""
        n = split(vm, bpns)
        if n:
            self.ctx.metrics.hugepage_splits.labels(self.service.name.lower()).inc(n)
        return n

    def finish(self, vm: VM, bpns: Pages, state: PageState = PageState.RESIDENT) -> None:
        """Pages leave this service: unmapped by the VMM (RESIDENT) or mapped again."""
        vm.p2m.state[bpns] = state
        vm.p2m.op[bpns] = NO_OP

    @staticmethod
    def ok_status(n: int) -> npt.NDArray[np.uint8]:
        return np.full(n, PageStatus.OK, dtype=np.uint8)


@dataclass
class Selection:
    """One low-priority batch: its pages, and the units of work choosing it took.

    ``work`` counts what the scheduler's cost model is per unit of: pages taken from the
    service's queue (candidates for page sharing, sample pages for sampling). It may be
    non-zero with no page in the batch: candidates found stale were dropped.
    """

    bpns: Pages
    mpns: npt.NDArray[np.int64]
    work: int

    @classmethod
    def empty(cls, work: int = 0) -> Selection:
        return cls(_EMPTY, _EMPTY, work)


class LowPriorityService(PlatformService):
    """A best-effort service, run inside the time bound of low-priority rounds; its place in
    the order is its type's class in ``lowprio.STRAWMAN_CLASSES``."""

    priority = Priority.LOW

    @abstractmethod
    def pending_work(self, vm: VM, now: float) -> int:
        """Units of work waiting for ``vm`` now (0: nothing to do this round)."""

    @abstractmethod
    def select_work(self, vm: VM, capacity: int, units: int, now: float) -> Selection:
        """A batch of at most ``capacity`` pages costing at most ``units`` units of work."""

    def has_work(self, vm: VM) -> bool:
        return self.pending_work(vm, self.ctx.clock()) > 0

    def select(self, vm: VM, capacity: int) -> tuple[Pages, npt.NDArray[np.int64]]:
        sel = self.select_work(vm, capacity, capacity, self.ctx.clock())
        return sel.bpns, sel.mpns

    def background(self) -> Coroutine[Any, Any, None] | None:
        """Work the service runs on its own, all the time (page sharing's scanner), or None.

        The daemon runs it as a task from startup and cancels it at shutdown.
        """
        return None
