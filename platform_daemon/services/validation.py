"""Remap validation: the second half of a remap, the VMM installing the page's new frame.

The talk splits a remap (a page moved to another frame: NUMA migration here) into two
halves. The invalidation half is the moving service's own batch: the VMM releases the page
and the platform copies it. The validation half, here, hands the VMM a PageList of pages
with their *new* frames (``mpn``), so that it maps them again before the guest touches them
and the guest pays no fault for the move. It is low priority, class 2 (after migration,
defrag and sharing), as the strawman orders validations; a page the guest touches first
simply faults (REMAP) and is dropped from the queue.

Why this direction is safe without any lock: a page waits here RESIDENT, and while its
batch is out it is SELECTED on the same frame, which nothing changes in between (a fault
maps that same frame; swap and retire take only RESIDENT or EXPOSED pages). So whatever the
VMM maps, by the batch or by a fault that crossed it, is the p2m's frame. A page the guest
gave to its balloon meanwhile is refused by the VMM (it checks that migration was the last
to take the page), and the balloon's completion leaves it untouched (ZERO).

Pages of a region the p2m says is large (2M promotion) go out with the status byte LARGE
instead of OK (``issue_marks``): the VMM maps a region large only on that word, since the
daemon may split a region the VMM does not map yet without a batch.

Swap read-ahead validation is the service's second queue (``readahead.py``): pages a swap-in
read ahead are held with their slot, and a batch after a window asks the VMM whether the
guest touched them; a batch may carry pages of both queues, told apart by their state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from shared.constants import PageState, PageStatus, ServiceType
from shared.distinct import distinct
from shared.messages import FaultReply

from ..hugepages import FLAG_LARGE
from ..p2m import FLAG_SHARED
from ..page_fifo import PageFifo
from .base import LowPriorityService, Pages, Selection
from .readahead import ReadAheadValidation

if TYPE_CHECKING:
    from ..context import ServiceContext
    from ..vm import VM

#: Pages waiting per VM at most; beyond it the oldest are dropped (they fault when touched).
MAX_QUEUE = 65536
_RESIDENT, _SELECTED = int(PageState.RESIDENT), int(PageState.SELECTED)
_EXPOSED = int(PageState.EXPOSED)


class ValidationService(LowPriorityService):
    """Re-exposes pages a remap left RESIDENT on their new frame."""

    service = ServiceType.VALIDATION
    #: The batch gives pages to the VMM: it marks them SELECTED itself and completes them
    #: into EXPOSED (mapped) or RESIDENT (refused), not IN_FLIGHT.
    takes_pages = False

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.queues: dict[int, PageFifo] = {}
        self.validated: dict[int, int] = {}  # per VM: pages the VMM mapped by a batch
        self.readahead = ReadAheadValidation(ctx)

    def enqueue(self, vm: VM, bpns: Pages) -> None:
        """Pages whose remap's first half is done (RESIDENT on their new frame)."""
        if len(bpns) == 0 or not vm.alive:
            return
        q = self.queues.get(vm.vm_id)
        if q is None:
            q = self.queues[vm.vm_id] = PageFifo(MAX_QUEUE)
        q.push(bpns)  # beyond MAX_QUEUE the oldest are dropped

    def pending_work(self, vm: VM, now: float) -> int:
        return len(self.queues.get(vm.vm_id, ())) + self.readahead.pending(vm, now)

    def select_work(self, vm: VM, capacity: int, units: int, now: float) -> Selection:
        """Remapped pages first, then read-ahead pages due for validation."""
        sel = self._select_remapped(vm, capacity, units)
        room = min(capacity - len(sel.bpns), units - sel.work)
        if room <= 0:
            return sel
        bpns, mpns, work = self.readahead.select(vm, room, now)
        if work == 0:
            return sel
        return Selection(
            np.concatenate((sel.bpns, bpns)), np.concatenate((sel.mpns, mpns)), sel.work + work
        )

    def _select_remapped(self, vm: VM, capacity: int, units: int) -> Selection:
        """Queued pages still RESIDENT and private, with the frame the VMM is to map."""
        q = self.queues.get(vm.vm_id)
        take = min(capacity, units, len(q) if q else 0)
        if not q or take <= 0:
            return Selection.empty()
        popped = distinct(q.pop(take))
        p2m = vm.p2m
        keep = (p2m.state[popped] == _RESIDENT) & ((p2m.flags[popped] & FLAG_SHARED) == 0)
        bpns = popped[keep & (p2m.frame[popped] >= 0)]
        p2m.state[bpns] = _SELECTED  # a fault meanwhile maps the same frame (MAPPED)
        return Selection(bpns, p2m.frame[bpns].astype(np.int64), take)

    def issue_marks(self, vm: VM, bpns: Pages) -> npt.NDArray[np.uint8] | None:
        """LARGE for each page of a region the p2m says is large (2M promotion moved it and
        nothing split it since), OK for the rest: the VMM maps a region large only on this
        word, since a region split without a batch (a swap-out of a page the VMM did not
        map, which failed or came back on the same frame) still lies on its run in order."""
        large = (vm.p2m.flags[bpns] & FLAG_LARGE) != 0
        if not large.any():
            return None
        return np.where(large, np.uint8(PageStatus.LARGE), np.uint8(PageStatus.OK))

    def complete(self, vm: VM, accepted: Pages, status: npt.NDArray[np.uint8]) -> None:
        """``accepted`` is the whole batch: the VMM mapped the OK pages, already mapped the
        CANCELLED ones (a fault got there first) and kept out the rest. A page no longer
        SELECTED faulted (it is EXPOSED on that frame) or was taken by the balloon: it is
        left as it is. Read-ahead pages of the batch go to ``readahead.py``."""
        if not vm.alive:  # its p2m is detached (read-only); frames and slots went with it
            return
        held = self.readahead.complete(vm, accepted, status)
        accepted, status = accepted[~held], status[~held]
        p2m = vm.p2m
        still = p2m.state[accepted] == _SELECTED
        ok = status == PageStatus.OK
        # RESIDENT only for what the VMM says it does not map: refused (STALE_FRAME) or let
        # go (UNTOUCHED). A SELECTED page need not be this batch's: a read-ahead page whose
        # hold ended while its verdict was out may be in a swap batch now, and a verdict
        # that keeps it mapped (REFERENCED, BUSY) must not make it RESIDENT, which swap
        # takes without asking the VMM (it would free the frame the guest uses). EXPOSED
        # is safe either way: a page the VMM does not map then faults to the same frame.
        # Such a page is never SELECTED by a batch that maps it (remap validation after a
        # move): every step of that path is a low batch, and the agent completes each low
        # batch before it asks for the next (tests/test_lowprio_one_batch_out.py).
        unmapped = (status == PageStatus.STALE_FRAME) | (status == PageStatus.UNTOUCHED)
        p2m.state[accepted[still & ~unmapped]] = _EXPOSED
        p2m.state[accepted[still & unmapped]] = _RESIDENT
        done = int(np.count_nonzero(still & ok))
        self.validated[vm.vm_id] = self.validated.get(vm.vm_id, 0) + done
        metrics = self.ctx.metrics.validated
        for outcome, count in (("mapped", done), ("refused", len(accepted) - done)):
            if count:
                metrics.labels(outcome).inc(count)

    def on_fault(self, vm: VM, bpn: int, write: bool) -> FaultReply:
        """Only read-ahead pages are in flight with this service."""
        return self.readahead.on_fault(vm, bpn)

    def on_vm_gone(self, vm: VM) -> None:
        self.queues.pop(vm.vm_id, None)
        self.validated.pop(vm.vm_id, None)
        self.readahead.on_vm_gone(vm)
