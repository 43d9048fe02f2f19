"""Ballooning, the platform's half: take back what backs the pages the guest's balloon gives.

The guest's balloon driver (the agent's ``balloon.py``) decides which pages to give: its
guest knows which are free or cheap to drop (its free pool first, then its page cache,
never its anonymous working set, never pinned pages). So BALLOON batches are *agent-filled*
(``agent_fills``): the daemon hands out a slot with room for the pages memsched still wants
from this VM (its balloon target less the balloon's size, which the agent reports in the
control region), the agent writes the pages it gives and completes with their count, and
``complete`` frees whatever backs them:

- a private frame is freed (retired if it was failing), a shared one loses a sharer;
- a swap slot is freed without being read: the balloon is no disk, a ballooned page is
  never swapped in (nor, having no frame, ever swapped out);
- an operation in flight on the page (a swap-out writing, a merge waiting) is cancelled
  first, as a write fault would cancel it.

The page is then untouched (ZERO) again: when the balloon gives it back to the guest and the
guest touches it, that is an ordinary first touch. Stores are ordered as everywhere: the p2m
stops naming a frame or slot before it is freed, so a crash in between loses nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from shared.constants import NO_FRAME, PageState, ServiceType

from ..p2m import FLAG_SHARED, NO_OP, NO_SLOT
from .base import Pages, PlatformService

if TYPE_CHECKING:
    from ..vm import VM

_IN_FLIGHT, _SWAPPED = int(PageState.IN_FLIGHT), int(PageState.SWAPPED)


class BalloonService(PlatformService):
    """High-priority release by the guest's balloon."""

    service = ServiceType.BALLOON
    takes_pages = False
    agent_fills = True

    def has_work(self, vm: VM) -> bool:
        return self.ctx.targets.balloon_deficit(vm) > 0

    def select(self, vm: VM, capacity: int) -> tuple[Pages, npt.NDArray[np.int64]]:
        """Room for the pages still wanted; the agent fills in which."""
        n = min(capacity, self.ctx.targets.balloon_deficit(vm))
        return np.zeros(n, dtype=np.int64), np.full(n, NO_FRAME, dtype=np.int64)

    def complete(self, vm: VM, accepted: Pages, status: npt.NDArray[np.uint8]) -> None:
        if len(accepted) == 0:
            return
        ctx, p2m = self.ctx, vm.p2m
        in_flight = accepted[p2m.state[accepted] == _IN_FLIGHT]
        if len(in_flight):
            ctx.cancel(vm, in_flight)
        # After the cancel: cancelling a promotion in flight completes it (the region becomes
        # large), and the split must see that, or the rest of the region stays marked large.
        self.split_large(vm, accepted)  # the rest of a large region stays, as small pages
        frames = p2m.frame[accepted].astype(np.int64)
        slots = p2m.swap_slot[accepted].astype(np.int64)
        shared = (p2m.flags[accepted] & FLAG_SHARED) != 0
        swapped = p2m.state[accepted] == _SWAPPED
        # The p2m forgets the pages first, then what backed them is freed.
        p2m.frame[accepted] = NO_FRAME
        p2m.swap_slot[accepted] = NO_SLOT
        p2m.flags[accepted] = 0
        p2m.op[accepted] = NO_OP
        p2m.state[accepted] = PageState.ZERO
        has_frame = frames >= 0
        ctx.machine.release_or_retire(frames[has_frame & ~shared])
        merged = frames[has_frame & shared]
        ctx.shared.unref(merged[ctx.shared.refs[merged] > 0])  # zero frames are not counted
        dropped = slots[swapped & (slots >= 0)]
        if ctx.swap is not None and len(dropped):
            ctx.swap.release(dropped)
        vm.stats.swap_dropped += len(dropped)
        vm.stats.ballooned += len(accepted)
        ctx.metrics.balloon_reclaimed.inc(len(accepted))
