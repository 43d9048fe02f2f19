"""memsched: host free-memory states, and per-VM balloon and swap targets.

States come from the free frames left under the host limit, as a fraction of it: free at or
above the *soft* threshold is HIGH, then SOFT, HARD and LOW below the *low* one (ESX's
6/4/2/1 %; ``high`` is where reclaim stops). Each threshold is at least one frame and none
is below the next, so the states work at any host limit: with no frame free the host is
LOW, whatever the limit.

- SOFT: reclaim starts, by ballooning; HARD: ballooning, and swap for the rest; LOW: first
  touches that need a frame wait, until free memory is back above the *hard* threshold
  (not merely out of LOW: no allocation storm right at the edge). Once started, reclaim
  goes on until free memory is back above ``high``; free memory beyond it lets balloons
  give pages back.
- From HARD down, and while a fault waits for a free frame, read-ahead pages held for
  validation are released at once (``services/readahead.py``), so that reclaim can take them.
- Every balance period (and at once when the state changes) ``balance.py`` decides how
  much each VM gives, by ESX'02's shares and idle memory tax, and by which method; memsched
  writes the targets to each VM's control region (the balloon target for the agent's
  balloon driver, the swap target for the swap service) and keeps the plan for status and
  metrics.

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

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from shared.constants import PAGE_SIZE, FreeState, ServiceType
from shared.errors import ErrorCode, VMMemError
from shared.sizes import format_size

from .balance import BalanceConfig, Balancer, VMPlan, VMState

if TYPE_CHECKING:
    from .server import PlatformServer
    from .vm import VM

log = structlog.get_logger("vmmem.platform.memsched")


class MemSched:
    """Turns free memory into a host state and per-VM balloon and swap targets."""

    period = 0.1  # seconds between ticks of the main loop

    def __init__(self, server: PlatformServer) -> None:
        self.server = server
        cfg = server.config
        self.state = FreeState.HIGH
        self.reclaiming = False
        #: First touches that need a frame wait (LOW, until free is back above hard).
        self.blocking = False
        self.balancer = Balancer(
            BalanceConfig(
                idle_tax=cfg.idle_tax,
                balloon=cfg.balloon,
                balloon_max_fraction=cfg.balloon_max_fraction,
            )
        )
        self.balance_period = cfg.balance_period
        self._next_balance = 0.0
        self.plans: dict[int, VMPlan] = {}
        self.swap_targets: dict[int, int] = {}
        self.balloon_targets: dict[int, int] = {}
        self._swap_was_full = False
        self._swap_ok = True
        #: Per VM: its balloon's refused pages as the last tick read them.
        self._refused_seen: dict[int, int] = {}

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
        self._next_balance = 0.0  # the next tick plans for the new limit at once

    def available(self) -> int:
        return self.server.machine.available()

    def thresholds(self) -> tuple[int, int, int, int]:
        """(high, soft, hard, low) in frames: at least one frame each, in order, so that the
        states work at any host limit (a tiny limit used to round them all to 0: HIGH with no
        frame free, and nothing reclaimed)."""
        cfg, limit = self.server.config, self.limit_pages
        low = max(1, math.ceil(limit * cfg.free_low_pct / 100))
        hard = max(low, math.ceil(limit * cfg.free_hard_pct / 100))
        soft = max(hard, math.ceil(limit * cfg.free_soft_pct / 100))
        high = max(soft, math.ceil(limit * cfg.free_high_pct / 100))
        return high, soft, hard, low

    def compute_state(self) -> FreeState:
        _, soft, hard, low = self.thresholds()
        free = self.available()
        if free >= soft:
            return FreeState.HIGH
        if free >= hard:
            return FreeState.SOFT
        if free >= low:
            return FreeState.HARD
        return FreeState.LOW

    def tick(self, now: float) -> None:
        """Recompute the state; each balance period (or on a change of state) the targets;
        kick the VMs."""
        state = self.compute_state()
        changed = state != self.state
        if changed:
            log.info("free_state", state=state.name.lower(), free_pages=self.available())
        self.state = state
        for vm in self.server.vms.values():
            vm.region.free_state = int(state)
        high, _, hard, _ = self.thresholds()
        free = self.available()
        if state >= FreeState.SOFT:
            self.reclaiming = True
        elif free >= high:
            self.reclaiming = False
        if state == FreeState.LOW:
            self.blocking = True
        elif free >= hard:
            self.blocking = False
        self._note_swap_full()
        self._end_read_ahead_holds(state)
        # Plans are made once a balance period, and at once when the state or whether swap
        # can take pages changes (a full device must stop swap-outs now, not in a period),
        # or a balloon refused pages (its share goes to swap now, not in a period).
        swap_ok = self.swap_usable(now)
        refused = self._balloon_refusals()
        if changed or swap_ok != self._swap_ok or refused or now >= self._next_balance:
            self._next_balance = now + self.balance_period
            self.balance(now)
        self._swap_ok = swap_ok
        for vm in list(self.server.vms.values()):
            self.server.kick(vm)

    def _balloon_refusals(self) -> bool:
        """Did a balloon asked for pages refuse some since the last tick? (One word read per
        VM: the agent's count of pages it had none to give.)"""
        seen, any_new = self._refused_seen, False
        for vm in self.server.vms.values():
            refused = vm.region.balloon_refused_pages
            if refused != seen.get(vm.vm_id, 0):
                seen[vm.vm_id] = refused
                any_new = any_new or self.balloon_targets.get(vm.vm_id, 0) > vm.region.balloon_pages
        return any_new

    def needs_frames(self, state: FreeState) -> bool:
        """The host needs frames: HARD or below, first touches blocked, or a fault waiting
        for a free frame (``waits.py``)."""
        waits = getattr(self.server, "waits", None)  # built after memsched
        return state >= FreeState.HARD or self.blocking or (waits is not None and waits.waiting > 0)

    def _end_read_ahead_holds(self, state: FreeState) -> None:
        """Held read-ahead pages cannot be reclaimed before their verdict, which follows
        guest progress: under pressure their holds end now (``services/readahead.py``)."""
        validation = self.server.services.get(ServiceType.VALIDATION)
        readahead = getattr(validation, "readahead", None)
        if readahead is not None:
            readahead.set_pressure(self.needs_frames(state))

    def balance(self, now: float) -> None:
        """Plan every VM's targets and write them to the control regions."""
        vms = list(self.server.vms.values())
        alloc = self.server.machine.allocator
        # Headroom may be negative after the host limit was lowered below what is in use:
        # then the excess must be reclaimed too, not just the free-memory target.
        headroom = min(alloc.free, self.limit_pages - alloc.used)
        high = self.thresholds()[0]
        need = high - headroom if self.reclaiming else min(0, high - headroom)
        swap_ok = self.swap_usable(now)
        plans = self.balancer.plan(
            [self.view(vm) for vm in vms], need, self.state, now, swap=swap_ok
        )
        self.plans = plans
        for vm in vms:
            plan = plans[vm.vm_id]
            swap_target = plan.swap_target if swap_ok and self.reclaiming else 0
            self.swap_targets[vm.vm_id] = swap_target
            vm.region.swap_target_pages = swap_target
            self.balloon_targets[vm.vm_id] = plan.balloon_target
            vm.region.balloon_target_pages = plan.balloon_target

    def configure(self, balance_period: float | None = None, **balance: Any) -> None:
        """Change settings at run time (``vmmem-ctl set-memsched``); the next tick plans
        with them."""
        if balance_period is not None:
            self.balance_period = balance_period
        if balance:
            self.balancer.config = replace(self.balancer.config, **balance)
        self._next_balance = 0.0

    def settings(self) -> dict[str, object]:
        cfg = self.balancer.config
        return {
            "balloon": cfg.balloon,
            "idle_tax": cfg.idle_tax,
            "balloon_max_fraction": cfg.balloon_max_fraction,
            "balance_period": self.balance_period,
        }

    def view(self, vm: VM) -> VMState:
        """What the balance reads of ``vm`` (one pass over its p2m: per balance period)."""
        frames = vm.p2m.frame
        zero = self.server.machine.zero_frame
        on_zero = (
            np.count_nonzero(np.isin(frames, zero))
            if len(zero) > 2
            else sum(int(np.count_nonzero(frames == z)) for z in zero)
        )
        sampling = self.server.services.get(ServiceType.SAMPLING)
        active = sampling.estimate_fraction(vm) if sampling is not None else None  # type: ignore[attr-defined]
        region = vm.region
        return VMState(
            vm_id=vm.vm_id,
            shares=vm.info.shares,
            guest_pages=vm.guest_pages,
            allocated=int(np.count_nonzero(frames >= 0)) - int(on_zero),
            active=active,
            balloon=region.balloon_pages,
            swapped=vm.stats.swapped_now,
            refaults=region.guest_refaults,
            stall_seconds=region.guest_stall_seconds,
            balloon_driver=vm.info.balloon_driver,
            balloon_refused=region.balloon_refused_pages,
        )

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

    def swap_deficit(self, vm: VM, in_flight: int) -> int:
        """Pages ``vm`` should still release to swap (0 when none)."""
        if not self.reclaiming:
            return 0
        target = self.swap_targets.get(vm.vm_id, 0)
        return max(0, target - vm.stats.swapped_now - in_flight)

    def balloon_deficit(self, vm: VM) -> int:
        """Pages ``vm``'s balloon should still take (its agent reports the balloon's size)."""
        return max(0, self.balloon_targets.get(vm.vm_id, 0) - vm.region.balloon_pages)

    def status(self, vm: VM) -> dict[str, object]:
        """The VM's memsched figures for ``vmmem-ctl status`` and the gauges."""
        plan = self.plans.get(vm.vm_id)
        region = vm.region
        sampling = self.server.services.get(ServiceType.SAMPLING)
        active = sampling.estimate_fraction(vm) if sampling is not None else None  # type: ignore[attr-defined]
        return {
            "shares": vm.info.shares,
            "rho": None if plan is None or math.isinf(plan.rho) else plan.rho,
            "target_pages": None if plan is None else plan.target_pages,
            "balloon_target": self.balloon_targets.get(vm.vm_id, 0),
            "balloon_pages": region.balloon_pages,
            "swap_target": self.swap_targets.get(vm.vm_id, 0),
            "swapped_pages": vm.stats.swapped_now,
            "wss_pages": None if active is None else round(active * vm.guest_pages),
            "refaults": region.guest_refaults,
            "stall_seconds": round(region.guest_stall_seconds, 3),
            "stall_fraction": None if plan is None else round(plan.stall_fraction, 4),
            "refaults_per_second": None if plan is None else round(plan.refault_rate, 2),
            "backed_off": False if plan is None else plan.backed_off,
            "balloon_stalled": False if plan is None else plan.balloon_stalled,
            "reclaimed": {"balloon": vm.stats.ballooned, "swap": vm.stats.swapped_out},
        }

    def on_vm_gone(self, vm: VM) -> None:
        self.swap_targets.pop(vm.vm_id, None)
        self.balloon_targets.pop(vm.vm_id, None)
        self._refused_seen.pop(vm.vm_id, None)
        self.plans.pop(vm.vm_id, None)
        self.balancer.forget(vm.vm_id)

    def counts(self) -> dict[str, int]:
        return {"limit_pages": self.limit_pages, "available_pages": self.available()}


def _pages(n: int) -> str:
    return f"{n} pages ({format_size(n * PAGE_SIZE)})"
