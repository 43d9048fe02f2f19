"""Page retire: move pages off failing frames, content intact; never use those frames again.

``PlatformServer.retire_frame`` marks a frame failing. A free frame simply leaves the free
pool. A frame whose page is exposed is queued here: the page is released through a
high-priority batch, copied to a healthy frame on the same node and left resident (the next
touch maps the new frame). A page the VMM does not map is moved at once. A page whose
swap-out is in flight needs nothing: its frame is retired instead of freed when the write
lands, and if a fault cancels the swap-out the page is back on the failing frame and the
queue takes it from there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from shared.constants import FaultReason, PageState, PageStatus, ServiceType
from shared.distinct import distinct
from shared.messages import FaultReply

from .base import Pages, PlatformService

if TYPE_CHECKING:
    from ..context import ServiceContext
    from ..vm import VM

_MOVABLE = (PageState.EXPOSED, PageState.SELECTED, PageState.RESIDENT, PageState.IN_FLIGHT)


class PageRetireService(PlatformService):
    """High-priority release service for pages on failing frames."""

    service = ServiceType.PAGE_RETIRE

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.queue: dict[int, set[int]] = {}

    def enqueue(self, vm: VM, bpn: int) -> None:
        self.queue.setdefault(vm.vm_id, set()).add(bpn)

    def _prune(self, vm: VM) -> list[int]:
        """Queued pages still on a failing frame; drop the rest (swapped, moved, gone)."""
        queued = self.queue.get(vm.vm_id, set())
        failing = self.ctx.machine.failing
        keep = [
            b
            for b in queued
            if vm.p2m.state[b] in _MOVABLE and vm.p2m.frame[b] >= 0 and failing[vm.p2m.frame[b]]
        ]
        self.queue[vm.vm_id] = set(keep)
        return keep

    def has_work(self, vm: VM) -> bool:
        # RESIDENT too: a page can land unmapped on a failing frame after retire_frame ran
        # (a failed swap-out write puts it back there); select() moves those at once.
        return any(
            vm.p2m.state[b] in (PageState.EXPOSED, PageState.RESIDENT) for b in self._prune(vm)
        )

    def select(self, vm: VM, capacity: int) -> tuple[Pages, npt.NDArray[np.int64]]:
        queued = np.array(sorted(self._prune(vm)), dtype=np.int64)
        if len(queued) == 0:
            return queued, queued
        resident = queued[vm.p2m.state[queued] == PageState.RESIDENT]
        self.move(vm, resident)  # nobody maps these: no need to ask the VMM
        picked = queued[vm.p2m.state[queued] == PageState.EXPOSED][:capacity]
        return picked, vm.p2m.frame[picked].astype(np.int64)

    def complete(self, vm: VM, accepted: Pages, status: npt.NDArray[np.uint8]) -> None:
        # The copy is a few KiB per page: done here, so no fault can ever find it half done.
        moved = self.move(vm, accepted)
        status[:] = PageStatus.OK
        if moved < len(accepted):
            # No frame to move to: the rest stays resident (content intact, still queued)
            # and is moved by a later round, when memory allows.
            rest = accepted[moved:]
            vm.p2m.state[rest] = PageState.RESIDENT
            vm.p2m.op[rest] = 0xFF
            status[moved:] = PageStatus.NO_SPACE

    def move(self, vm: VM, bpns: Pages) -> int:
        """Copy ``bpns`` to healthy frames (same node when it has room); retire the old ones.

        Moves as many as there are frames for, in order, and returns how many.
        """
        machine = self.ctx.machine
        bpns = bpns[: machine.available()]
        if len(bpns) == 0:
            return 0
        self.split_large(vm, bpns)  # unmapped pages move without a batch: split here
        old = vm.p2m.frame[bpns].astype(np.int64)
        nodes = machine.allocator.node_of(old)
        new = np.empty_like(old)
        for node in distinct(nodes):
            sel = nodes == node
            new[sel] = machine.allocator.allocate(int(sel.sum()), int(node))
        machine.frames[new] = machine.frames[old]
        self.ctx.mapper.map_private(vm, bpns, new)
        vm.p2m.state[bpns] = PageState.RESIDENT
        vm.p2m.op[bpns] = 0xFF
        machine.release_or_retire(old)  # failing: retired, never handed out again
        queued = self.queue.get(vm.vm_id, set())
        queued.difference_update(bpns.tolist())
        vm.stats.retired_moves += len(bpns)
        return len(bpns)

    def on_fault(self, vm: VM, bpn: int, write: bool) -> FaultReply:
        """Complete the move (it is synchronous, so it already is), then map the new frame."""
        if vm.p2m.frame[bpn] >= 0 and self.ctx.machine.failing[vm.p2m.frame[bpn]]:
            self.move(vm, np.array([bpn]))
        vm.p2m.state[bpn] = PageState.EXPOSED
        return self.ctx.mapper.reply(vm, FaultReason.COMPLETE, np.array([bpn]))

    def on_vm_gone(self, vm: VM) -> None:
        self.queue.pop(vm.vm_id, None)
