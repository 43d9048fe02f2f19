"""memsched, first part: host free-memory states and per-VM swap targets.

States come from the free frames left under the host limit, as a percentage of it:
``free >= soft`` is HIGH, ``hard <= free < soft`` is SOFT, ``low <= free < hard`` is HARD,
below ``low`` is LOW. (Thresholds default to ESX's 6/4/2/1 %; ``high`` is where reclaim
stops: once swapping has started it goes on until free memory is back above ``high``.)

From HARD down, the pages to reclaim are split across VMs in proportion to their resident
pages divided by their shares, so a VM with more shares per page gives less. In LOW, faults
that need a new frame wait (bounded, counted) for reclaim instead of failing.

Swap is not counted on while it is full (no free slot, or the last write found no space on
the device): VMs are not asked to release pages that could go nowhere. After a write failed
for lack of space, the swap service pauses (its backoff); when the pause is over, targets are
set again, so one swap-out tries the device again, and the full state ends when a write
succeeds.

The host limit (``vmmem-ctl set-host-limit``) is at most the host's memory, and at least
``minimum_limit()``: the frames the daemon holds itself, which no reclaim can give back,
plus one so that a fault can still be served.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import structlog

from shared.constants import PAGE_SIZE, FreeState, PageState, ServiceType
from shared.errors import ErrorCode, VMMemError
from shared.sizes import format_size

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
        self._swap_was_full = False

    @property
    def limit_pages(self) -> int:
        return self.server.machine.limit_pages

    def held_by_daemon(self) -> dict[str, int]:
        """Frames in use that no reclaim can give back, by kind: the zero frames (the host's
        own), merged frames (swap takes private pages only; they go with their last sharer),
        and old frames kept alive for mappings p2mUpdate has not dropped yet."""
        p2m_update = self.server.services.get(ServiceType.P2M_UPDATE)
        return {
            "zero_frames": len(self.server.machine.zero_frame),
            "merged_frames": self.server.shared.frames,
            "stale_frames": p2m_update.stale_frames() if p2m_update is not None else 0,  # type: ignore[attr-defined]
        }

    def minimum_limit(self) -> int:
        """The lowest host limit accepted, in frames: what the daemon holds itself, plus one
        frame so that a fault can still be served (below that, nothing could ever be)."""
        return sum(self.held_by_daemon().values()) + 1

    def set_host_limit(self, pages: int) -> None:
        """Memory the VMs may use, in frames: from ``minimum_limit()`` to the host's memory.

        Anything else raises VMMemError(BAD_REQUEST) and changes nothing: a limit above the
        host's memory is refused, not capped, and 0 is not taken for 1.
        """
        host = self.server.machine.host_pages
        if pages > host:
            raise VMMemError(
                f"host limit {_pages(pages)} is more than the host's memory ({_pages(host)})",
                ErrorCode.BAD_REQUEST,
            )
        floor = self.minimum_limit()
        if pages < floor:
            held = ", ".join(
                f"{n} {kind.replace('_', ' ')}" for kind, n in self.held_by_daemon().items()
            )
            raise VMMemError(
                f"host limit {_pages(pages)} is below what the daemon itself needs: "
                f"{_pages(floor)} ({held}, and one frame for a fault)",
                ErrorCode.BAD_REQUEST,
            )
        self.server.machine.limit_pages = pages

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
        self._note_swap_full()
        if self.reclaiming and self.swap_usable(now):
            self._set_swap_targets()
        else:
            self.swap_targets.clear()
            for vm in self.server.vms.values():
                vm.region.swap_target_pages = 0
        for vm in list(self.server.vms.values()):
            self.server.kick(vm)

    def swap_full(self) -> str | None:
        """Why the swap device is full (no free slot, or no space left on the device after
        the last write), or None when it is not (or there is no swap)."""
        swap = self.server.swap
        if swap is None:
            return None
        if swap.free == 0:
            return "no free slot"
        swap_svc = self.server.services.get(ServiceType.SWAP)
        if getattr(swap_svc, "no_space", False):
            return "no space left on the device"
        return None

    def swap_usable(self, now: float) -> bool:
        """May reclaim count on swap now? Not while it is full; a device that ran out of
        space is tried again once the swap service's pause after that failure is over."""
        if self.server.swap is None or self.server.swap.free == 0:
            return False
        swap_svc = self.server.services.get(ServiceType.SWAP)
        if getattr(swap_svc, "no_space", False):
            return now >= float(getattr(swap_svc, "paused_until", 0.0))
        return True

    def _note_swap_full(self) -> None:
        """Log when the swap device fills up or has room again (state changes only)."""
        why = self.swap_full()
        if (why is not None) != self._swap_was_full:
            swap = self.server.swap
            free = swap.free if swap is not None else 0
            if why is not None:
                log.warning("swap_full", reason=why, free_slots=free)
            else:
                log.info("swap_available", free_slots=free)
        self._swap_was_full = why is not None

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


def _pages(n: int) -> str:
    return f"{n} pages ({format_size(n * PAGE_SIZE)})"
