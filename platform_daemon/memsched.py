"""memsched, first part: host free-memory states and per-VM swap targets.

States come from the free frames left under the host limit, as a percentage of it:
``free >= soft`` is HIGH, ``hard <= free < soft`` is SOFT, ``low <= free < hard`` is HARD,
below ``low`` is LOW. (Thresholds default to ESX's 6/4/2/1 %; ``high`` is where reclaim
stops: once swapping has started it goes on until free memory is back above ``high``.)

From HARD down, the pages to reclaim are split across VMs in proportion to their resident
pages divided by their shares, so a VM with more shares per page gives less. In LOW, faults
that need a new frame wait (bounded, counted) for reclaim instead of failing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import structlog

from shared.constants import FreeState, PageState

if TYPE_CHECKING:
    from .server import PlatformServer
    from .vm import VM

log = structlog.get_logger("vmmem.platform.memsched")


class MemSched:
    """Turns free memory into a host state and per-VM swap targets."""

    period = 0.1  # seconds between ticks of the main loop

    def __init__(self, server: PlatformServer) -> None:
        self.server = server
        self.state = FreeState.HIGH
        self.reclaiming = False
        self.swap_targets: dict[int, int] = {}

    @property
    def limit_pages(self) -> int:
        return self.server.machine.limit_pages

    def set_host_limit(self, pages: int) -> None:
        """Memory the VMs may use, in frames (at most the machine's own)."""
        self.server.machine.limit_pages = max(1, min(pages, self.server.machine.host_pages))

    def available(self) -> int:
        return self.server.machine.available()

    def threshold(self, pct: float) -> int:
        return int(self.limit_pages * pct / 100)

    def compute_state(self) -> FreeState:
        cfg, free = self.server.config, self.available()
        if free >= self.threshold(cfg.free_soft_pct):
            return FreeState.HIGH
        if free >= self.threshold(cfg.free_hard_pct):
            return FreeState.SOFT
        if free >= self.threshold(cfg.free_low_pct):
            return FreeState.HARD
        return FreeState.LOW

    def tick(self, now: float) -> None:
        """Recompute the state and, when reclaim is needed, the swap targets; kick VMs."""
        state = self.compute_state()
        if state != self.state:
            log.info("free_state", state=state.name.lower(), free_pages=self.available())
        self.state = state
        for vm in self.server.vms.values():
            vm.region.free_state = int(state)
        if state >= FreeState.HARD:
            self.reclaiming = True
        elif self.available() >= self.threshold(self.server.config.free_high_pct):
            self.reclaiming = False
        if self.reclaiming and self.server.swap is not None:
            self._set_swap_targets()
        else:
            self.swap_targets.clear()
        for vm in list(self.server.vms.values()):
            self.server.kick(vm)

    def _set_swap_targets(self) -> None:
        vms = list(self.server.vms.values())
        if not vms:
            return
        # Headroom may be negative after the host limit was lowered below what is in use:
        # then the excess must be reclaimed too, not just the free-memory target.
        alloc = self.server.machine.allocator
        headroom = min(alloc.free, self.limit_pages - alloc.used)
        need = self.threshold(self.server.config.free_high_pct) - headroom
        resident = np.array([self._resident(vm) for vm in vms], dtype=np.float64)
        shares = np.array([vm.info.shares for vm in vms], dtype=np.float64)
        weight = resident / shares
        if need <= 0 or weight.sum() <= 0:
            return
        split = np.minimum(resident, np.ceil(need * weight / weight.sum()))
        swap = self.server.swap
        assert swap is not None
        for vm, pages in zip(vms, split.astype(np.int64).tolist(), strict=True):
            target = int(vm.stats.swapped_out - vm.stats.swapped_in) + pages
            self.swap_targets[vm.vm_id] = target
            vm.region.swap_target_pages = target

    @staticmethod
    def _resident(vm: VM) -> int:
        st = vm.p2m.state
        return int(np.count_nonzero((st == PageState.EXPOSED) | (st == PageState.RESIDENT)))

    def swap_deficit(self, vm: VM, in_flight: int) -> int:
        """Pages ``vm`` should still release to swap (0 when none)."""
        if not self.reclaiming:
            return 0
        target = self.swap_targets.get(vm.vm_id, 0)
        swapped = vm.stats.swapped_out - vm.stats.swapped_in
        return max(0, target - swapped - in_flight)

    def on_vm_gone(self, vm: VM) -> None:
        self.swap_targets.pop(vm.vm_id, None)

    def counts(self) -> dict[str, int]:
        return {"limit_pages": self.limit_pages, "available_pages": self.available()}
