"""memsched's balance: who gives memory back, how much, and by which method (pure code).

Waldspurger, "Memory Resource Management in VMware ESX Server" (OSDI 2002), sections 3, 5
and 6. Each VM's claim on memory is its shares per page, with idle pages taxed:

    rho = S / (P · (f + k·(1 - f))),   k = 1 / (1 - τ)

S its shares, P the pages it holds now, f the fraction of them it actively uses (the
working-set estimate of the sampling service), τ the idle memory tax (default 0.75, so an
idle page costs 4 active ones). Memory is reclaimed from the VM with the lowest rho first
("min-funding revocation"): ``plan`` hands out the pages to reclaim in small chunks, each to
the VM whose rho is lowest counting what it already gave, so VMs end up with similar rho and an
idle VM gives more than a busy one of the same shares.

The method follows the host's free state: SOFT reclaims by ballooning only, HARD (and LOW)
by ballooning and then swap for what the balloon cannot take. A balloon never holds more
than a set fraction of its guest (ESX: 65 %), and never so much that the guest is left with
less than its working set, so ballooning cannot spiral a guest down.

Guest impact: each VM reports its page-cache refaults and stall time. When, over a period,
its stall fraction or its refault rate crosses a threshold, the VM *backs off*: its balloon
stops growing and gives back a step, swap takes its share instead, and the back-off holds
for a while after the impact falls (no flapping).

A balloon that does not inflate falls back to swap the same way (ESX "falls back to paging"
when ballooning is impossible or too slow): when it took less than a tenth of what it was
asked for, over a whole impact window or by the time its driver reports pages it had none
to give, its share goes to swap for the hold time, and it is asked for no more. A guest
whose memory is all its programs' (no free pages, no page cache to drop) gives its balloon
nothing, and a halted guest's driver does not run; before this the balloon's share of a
reclaim was never swapped and the host stayed over its limit.

With ballooning off (``balloon=False``, the swap-only comparison) every method is swap.
No I/O and no clock of its own: the caller passes ``now``; tests drive it on virtual time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shared.constants import FreeState

#: Reclaim is handed out in this many chunks at least (finer: closer to equal rho).
CHUNKS = 64


@dataclass(frozen=True)
class BalanceConfig:
    """The knobs (``vmmem-platform`` flags, ``vmmem-ctl set-memsched``)."""

    idle_tax: float = 0.75
    balloon: bool = True
    balloon_max_fraction: float = 0.65
    #: Back off when the guest was stalled more than this fraction of a period...
    impact_stall_fraction: float = 0.10
    #: ...or refaulted more than this fraction of its pages per second.
    impact_refault_fraction: float = 0.02
    #: A backed-off VM stays so this long after its impact falls below the thresholds.
    backoff_hold_seconds: float = 5.0
    #: While backed off and impacted, its balloon target shrinks by this fraction a period.
    backoff_step: float = 0.10
    #: Impact is judged over at least this long: balances forced by a change of state or of
    #: the limit come closer together, and over a short window a brief stall (a slow fault
    #: on a busy host) is a large fraction.
    impact_window_seconds: float = 1.0

    @property
    def tax_factor(self) -> float:
        """k = 1 / (1 - τ)."""
        return 1.0 / (1.0 - self.idle_tax)


@dataclass(frozen=True)
class VMState:
    """What the balance reads of one VM."""

    vm_id: int
    shares: int
    guest_pages: int
    #: Pages backed by machine memory now (frames of its own or shared).
    allocated: int
    #: Active fraction of guest memory (working-set estimate); None before the first.
    active: float | None
    balloon: int
    swapped: int
    #: Cumulative guest counters from the agent.
    refaults: int = 0
    stall_seconds: float = 0.0
    #: The guest has a balloon driver; without one the VM is reclaimed by swap only.
    balloon_driver: bool = True
    #: Cumulative pages its balloon was asked for and had none to give (agent-written).
    balloon_refused: int = 0


@dataclass(frozen=True)
class VMPlan:
    """What the balance decided for one VM."""

    rho: float
    #: Pages it is to give back now (by balloon and swap together).
    reclaim: int
    #: The memory it is to hold once they are given.
    target_pages: int
    balloon_target: int
    swap_target: int
    backed_off: bool
    stall_fraction: float = 0.0
    refault_rate: float = 0.0
    #: Its balloon took too little of what it was asked for: swap takes its share for now.
    balloon_stalled: bool = False


def _active(v: VMState) -> float:
    """The active fraction; before the first estimate, all of it (no idle tax on a guess)."""
    return 1.0 if v.active is None else v.active


def rho(shares: float, pages: float, active: float, tax_factor: float) -> float:
    """Shares per page, idle pages charged ``tax_factor`` times (∞ for a VM holding none)."""
    cost = pages * (active + tax_factor * (1.0 - active))
    return math.inf if cost <= 0 else shares / cost


class Balancer:
    """Plans balloon and swap targets per VM; remembers each VM's impact and back-off."""

    def __init__(self, config: BalanceConfig | None = None) -> None:
        self.config = config or BalanceConfig()
        self._seen: dict[int, tuple[float, int, float]] = {}
        self._backoff_until: dict[int, float] = {}
        self._impact: dict[int, tuple[float, float]] = {}
        #: Per VM: since when its balloon owes pages, its size then, what it owed, and the
        #: pages it had refused then.
        self._owing: dict[int, tuple[float, int, int, int]] = {}
        self._balloon_stalled_until: dict[int, float] = {}

    def forget(self, vm_id: int) -> None:
        self._seen.pop(vm_id, None)
        self._backoff_until.pop(vm_id, None)
        self._impact.pop(vm_id, None)
        self._owing.pop(vm_id, None)
        self._balloon_stalled_until.pop(vm_id, None)

    def plan(
        self, vms: list[VMState], need: int, state: FreeState, now: float, swap: bool = True
    ) -> dict[int, VMPlan]:
        """Targets for every VM. ``need`` > 0: pages to reclaim now; < 0: pages free beyond
        the high threshold, which balloons may give back; 0: hold. ``swap``: whether swap
        can take pages now (not while the device is full, nor without one)."""
        cfg = self.config
        impact = {v.vm_id: self._judge(v, now) for v in vms}
        reclaim = self._split(vms, max(0, need)) if need > 0 else [0] * len(vms)
        give_back = self._give_back(vms, -need) if need < 0 else [0] * len(vms)
        plans: dict[int, VMPlan] = {}
        for v, take, give in zip(vms, reclaim, give_back, strict=True):
            stall, refaults, backed_off = impact[v.vm_id]
            f = _active(v)
            stalled = self._balloon_stalled(v, now)
            ballooning = cfg.balloon and v.balloon_driver and not stalled
            balloon_on = ballooning and state >= FreeState.SOFT and need > 0
            swap_on = (
                swap and need > 0 and (state >= FreeState.HARD or not ballooning or backed_off)
            )
            balloon_target = v.balloon - give
            by_balloon = 0
            if backed_off:
                balloon_target = int(v.balloon * (1.0 - cfg.backoff_step))
            elif balloon_on:
                by_balloon = min(take, max(0, self.balloon_room(v) - v.balloon))
                balloon_target = v.balloon + by_balloon
            by_swap = take - by_balloon if swap_on else 0
            self._note_asked(v, balloon_target, now)
            plans[v.vm_id] = VMPlan(
                rho=rho(v.shares, v.allocated, f, cfg.tax_factor),
                reclaim=by_balloon + by_swap,
                target_pages=max(0, v.allocated - by_balloon - by_swap),
                balloon_target=max(0, balloon_target),
                swap_target=v.swapped + by_swap,
                backed_off=backed_off,
                stall_fraction=stall,
                refault_rate=refaults,
                balloon_stalled=stalled,
            )
        return plans

    def _note_asked(self, v: VMState, target: int, now: float) -> None:
        """Remember since when ``v``'s balloon owes pages (kept while it still owes)."""
        if target <= v.balloon:
            self._owing.pop(v.vm_id, None)
        elif v.vm_id not in self._owing:
            self._owing[v.vm_id] = (now, v.balloon, target - v.balloon, v.balloon_refused)

    def _balloon_stalled(self, v: VMState, now: float) -> bool:
        """Did ``v``'s balloon take less than a tenth of what it owed, over a whole window or
        with its driver saying it has no page to give? Then it stays stalled for
        ``backoff_hold_seconds`` (swap takes its share), and is judged afresh after. A working
        driver inflates up to 2048 pages/s (token bucket), and refuses only what may not
        leave the guest (its programs' pages, pinned or busy ones), so a refusal need not
        wait for the window."""
        cfg = self.config
        owing = self._owing.get(v.vm_id)
        if owing is not None:
            since, size, owed, refused = owing
            short = v.balloon - size < max(1, owed // 10)
            if now - since >= cfg.impact_window_seconds or (short and v.balloon_refused > refused):
                del self._owing[v.vm_id]  # the next window starts with the next ask
                if short:
                    self._balloon_stalled_until[v.vm_id] = now + cfg.backoff_hold_seconds
        return now < self._balloon_stalled_until.get(v.vm_id, -math.inf)

    def balloon_room(self, v: VMState) -> int:
        """The most a balloon may hold: the cap, and never eating into the working set."""
        working_set = math.ceil(_active(v) * v.guest_pages)
        cap = int(self.config.balloon_max_fraction * v.guest_pages)
        return max(0, min(cap, v.guest_pages - working_set))

    def _split(self, vms: list[VMState], need: int) -> list[int]:
        """Min-funding revocation: ``need`` pages, a chunk at a time, each from the VM with
        the lowest rho counting what it already gave; a VM gives at most what it holds."""
        if not vms:
            return []
        k = self.config.tax_factor
        shares = np.array([v.shares for v in vms], dtype=np.float64)
        active = np.array([_active(v) for v in vms])
        weight = active + k * (1.0 - active)
        held = np.array([v.allocated for v in vms], dtype=np.int64)
        taken = np.zeros(len(vms), dtype=np.int64)
        chunk = max(1, math.ceil(need / CHUNKS))
        left = need
        while left > 0:
            room = held - taken
            if not (room > 0).any():
                break
            cost = room * weight
            with np.errstate(divide="ignore"):
                rhos = np.where((room > 0) & (cost > 0), shares / np.maximum(cost, 1e-300), np.inf)
            i = int(np.argmin(rhos))
            step = int(min(chunk, left, room[i]))
            taken[i] += step
            left -= step
        return [int(t) for t in taken]

    def _give_back(self, vms: list[VMState], surplus: int) -> list[int]:
        """Free memory beyond the high threshold goes back to balloons, to the VM with the
        highest rho first (the one most entitled to more memory per share)."""
        k = self.config.tax_factor
        rhos = [rho(v.shares, v.allocated, _active(v), k) for v in vms]
        order = sorted(range(len(vms)), key=lambda i: -rhos[i])
        give = [0] * len(vms)
        for i in order:
            if surplus <= 0:
                break
            give[i] = min(vms[i].balloon, surplus)
            surplus -= give[i]
        return give

    def _judge(self, v: VMState, now: float) -> tuple[float, float, bool]:
        """Stall fraction and refaults per second over the last window of at least
        ``impact_window_seconds`` (judged when one is complete); back-off state."""
        cfg = self.config
        last = self._seen.get(v.vm_id)
        if last is None or now - last[0] >= cfg.impact_window_seconds:
            self._seen[v.vm_id] = (now, v.refaults, v.stall_seconds)
        if last is not None and now - last[0] >= cfg.impact_window_seconds and now > last[0]:
            dt = now - last[0]
            stall = max(0.0, (v.stall_seconds - last[2]) / dt)
            refaults = max(0.0, (v.refaults - last[1]) / dt)
            self._impact[v.vm_id] = (stall, refaults)
            hurt = (
                stall > cfg.impact_stall_fraction
                or refaults > cfg.impact_refault_fraction * v.guest_pages
            )
            if hurt:
                self._backoff_until[v.vm_id] = now + cfg.backoff_hold_seconds
        stall, refaults = self._impact.get(v.vm_id, (0.0, 0.0))
        return stall, refaults, now < self._backoff_until.get(v.vm_id, -math.inf)
