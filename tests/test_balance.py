"""memsched's balance on virtual time: rho, min-funding revocation, methods by free state,
the balloon's cap and working-set floor, guest-impact back-off, giving memory back."""

from __future__ import annotations

import math

import pytest

from platform_daemon.balance import BalanceConfig, Balancer, VMState, rho
from shared.constants import FreeState

N = 10_000  # guest pages of every VM here


def vm(vm_id: int, active: float | None, **kw: object) -> VMState:
    base: dict[str, object] = {
        "vm_id": vm_id,
        "shares": 1000,
        "guest_pages": N,
        "allocated": N,
        "active": active,
        "balloon": 0,
        "swapped": 0,
    }
    return VMState(**{**base, **kw})  # type: ignore[arg-type]


def test_rho_is_esx_formula() -> None:
    """rho = S / (P (f + k (1 - f))), k = 1 / (1 - tau): with tau = 0.75 an idle page costs
    four active ones."""
    k = BalanceConfig(idle_tax=0.75).tax_factor
    assert k == pytest.approx(4.0)
    assert rho(1000, 1000, 1.0, k) == pytest.approx(1.0)
    assert rho(1000, 1000, 0.0, k) == pytest.approx(0.25)
    assert rho(1000, 1000, 0.5, k) == pytest.approx(1000 / (1000 * (0.5 + 4 * 0.5)))
    assert math.isinf(rho(1000, 0, 0.5, k))


def test_idle_vm_gives_first_and_more() -> None:
    """Same shares, same pages: the idle VM (10 % active) has the lower rho and gives all of
    a small reclaim; a large one is split so that rhos end about equal, idle giving more."""
    b = Balancer()
    idle, busy = vm(1, 0.1), vm(2, 0.9)
    small = b.plan([idle, busy], 1000, FreeState.HARD, now=0.0)
    assert small[1].reclaim == 1000 and small[2].reclaim == 0
    large = b.plan([idle, busy], 8000, FreeState.HARD, now=1.0)
    assert large[1].reclaim + large[2].reclaim == 8000
    assert large[1].reclaim > 2 * large[2].reclaim
    k = b.config.tax_factor
    left_idle = rho(1000, N - large[1].reclaim, 0.1, k)
    left_busy = rho(1000, N - large[2].reclaim, 0.9, k)
    assert left_idle == pytest.approx(left_busy, rel=0.05)


def test_no_idle_tax_splits_by_pages_alone() -> None:
    """With tau = 0 activity does not matter: equal shares and pages give equally."""
    b = Balancer(BalanceConfig(idle_tax=0.0))
    plan = b.plan([vm(1, 0.1), vm(2, 0.9)], 4000, FreeState.HARD, now=0.0)
    assert abs(plan[1].reclaim - plan[2].reclaim) <= 4000 / 64


def test_soft_balloons_only_hard_swaps_the_rest() -> None:
    """SOFT: the balloon takes what it may, swap nothing. HARD: the balloon first, then swap
    for what the balloon cannot take (its cap and the working-set floor)."""
    b = Balancer()
    v = vm(1, 0.5)  # room for the balloon: min(65 %, 50 %) of N = 5000 pages
    soft = b.plan([v], 7000, FreeState.SOFT, now=0.0)[1]
    assert soft.balloon_target == 5000 and soft.swap_target == 0
    # Half a window later: the balloon has not been judged yet (a whole window without it
    # growing would count as stalled: the test below).
    hard = b.plan([v], 7000, FreeState.HARD, now=0.5)[1]
    assert hard.balloon_target == 5000 and hard.swap_target == 2000
    assert hard.target_pages == N - 7000


def test_balloon_cap_and_working_set_floor() -> None:
    b = Balancer(BalanceConfig(balloon_max_fraction=0.65))
    assert b.balloon_room(vm(1, 0.1)) == int(0.65 * N)  # the cap binds
    assert b.balloon_room(vm(1, 0.8)) == N - 8000  # the working set binds
    assert b.balloon_room(vm(1, None)) == 0  # no estimate yet: assume all of it active
    plan = b.plan([vm(1, 0.8, balloon=1500)], 5000, FreeState.SOFT, now=0.0)[1]
    assert plan.balloon_target == 2000  # never eats into the working set


def test_without_a_driver_or_with_ballooning_off_swap_does_it() -> None:
    """A VM without a balloon driver is reclaimed by swap, in SOFT too (its share must come
    from somewhere); with ballooning off every VM is (the swap-only comparison)."""
    b = Balancer()
    nodriver = vm(1, 0.2, balloon_driver=False)
    plan = b.plan([nodriver], 1000, FreeState.SOFT, now=0.0)[1]
    assert plan.balloon_target == 0 and plan.swap_target == 1000
    off = Balancer(BalanceConfig(balloon=False))
    plan = off.plan([vm(1, 0.2)], 1000, FreeState.SOFT, now=0.0)[1]
    assert plan.balloon_target == 0 and plan.swap_target == 1000


def test_swap_unusable_takes_nothing() -> None:
    plan = Balancer().plan([vm(1, 0.9, swapped=10)], 3000, FreeState.HARD, 0.0, swap=False)
    assert plan[1].swap_target == 10  # holds what is in swap, asks for no more


def test_guest_impact_backs_the_balloon_off_and_swap_takes_the_rest() -> None:
    """A stall fraction over the threshold in a period: the balloon shrinks a step instead of
    growing, the VM's reclaim goes to swap (in SOFT too), and the back-off holds for
    ``backoff_hold_seconds`` after the impact is gone."""
    cfg = BalanceConfig(impact_stall_fraction=0.1, backoff_hold_seconds=5.0, backoff_step=0.1)
    b = Balancer(cfg)
    v = vm(1, 0.2, balloon=3000, stall_seconds=0.0)
    calm = b.plan([v], 2000, FreeState.SOFT, now=0.0)[1]
    assert not calm.backed_off and calm.balloon_target == 5000
    hurt = vm(1, 0.2, balloon=3000, stall_seconds=0.5)  # stalled half of the next second
    plan = b.plan([hurt], 2000, FreeState.SOFT, now=1.0)[1]
    assert plan.backed_off and plan.stall_fraction == pytest.approx(0.5)
    assert plan.balloon_target == 2700  # 10 % given back
    assert plan.swap_target == 2000  # swap takes the VM's share
    quiet = vm(1, 0.2, balloon=2700, stall_seconds=0.5)  # no stall since
    assert b.plan([quiet], 2000, FreeState.SOFT, now=3.0)[1].backed_off  # still held
    after = b.plan([quiet], 2000, FreeState.SOFT, now=7.0)[1]
    assert not after.backed_off and after.balloon_target > 2700


def test_a_balloon_that_does_not_inflate_falls_back_to_swap() -> None:
    """Asked for pages, a balloon that takes less than a tenth of them over a whole impact
    window is stalled: its share goes to swap (in SOFT too) and it is asked for no more
    until ``backoff_hold_seconds`` have passed; then it is asked again. A balloon that
    inflates is never stalled. (A guest whose memory is all its programs' gives its balloon
    nothing: before, its share of the reclaim was never swapped.)"""
    cfg = BalanceConfig(impact_window_seconds=1.0, backoff_hold_seconds=5.0)
    b = Balancer(cfg)
    idle = vm(1, 0.1)  # room for the balloon: 65 % of N
    first = b.plan([idle], 3000, FreeState.HARD, now=0.0)[1]
    assert first.balloon_target == 3000 and first.swap_target == 0
    assert not first.balloon_stalled
    still = b.plan([vm(1, 0.1, balloon=299)], 3000, FreeState.HARD, now=1.0)[1]
    assert still.balloon_stalled  # 299 of 3000 owed: under a tenth in a whole window
    assert still.balloon_target == 299 and still.swap_target == 3000
    soft = b.plan([vm(1, 0.1, balloon=299)], 3000, FreeState.SOFT, now=3.0)[1]
    assert soft.balloon_stalled and soft.swap_target == 3000  # swap in SOFT too
    again = b.plan([vm(1, 0.1, balloon=299)], 3000, FreeState.HARD, now=6.5)[1]
    assert not again.balloon_stalled and again.balloon_target == 299 + 3000

    working = Balancer(cfg)
    working.plan([idle], 3000, FreeState.HARD, now=0.0)
    grew = working.plan([vm(1, 0.1, balloon=300)], 2700, FreeState.HARD, now=1.0)[1]
    assert not grew.balloon_stalled  # a tenth of what it owed: inflating
    assert grew.balloon_target == 3000 and grew.swap_target == 0


def test_a_balloon_that_refuses_pages_is_stalled_at_once() -> None:
    """When the driver says it had no page to give (its refused count rose) and the balloon
    grew by less than a tenth of what it owed, the balloon is stalled without waiting for
    the window; a refusal while it inflates, or no refusal, waits for the window."""
    cfg = BalanceConfig(impact_window_seconds=1.0)
    b = Balancer(cfg)
    b.plan([vm(1, 0.1)], 3000, FreeState.HARD, now=0.0)
    waiting = b.plan([vm(1, 0.1)], 3000, FreeState.HARD, now=0.1)[1]
    assert not waiting.balloon_stalled  # nothing refused yet: the window decides
    refused = b.plan([vm(1, 0.1, balloon_refused=512)], 3000, FreeState.HARD, now=0.2)[1]
    assert refused.balloon_stalled and refused.swap_target == 3000

    inflating = Balancer(cfg)
    inflating.plan([vm(1, 0.1)], 3000, FreeState.HARD, now=0.0)
    grew = vm(1, 0.1, balloon=400, balloon_refused=100)  # gave 400, refused 100 (pinned)
    plan = inflating.plan([grew], 2600, FreeState.HARD, now=0.2)[1]
    assert not plan.balloon_stalled and plan.swap_target == 0


def test_refault_rate_also_backs_off() -> None:
    b = Balancer(BalanceConfig(impact_refault_fraction=0.02))
    b.plan([vm(1, 0.2, refaults=0)], 1000, FreeState.SOFT, now=0.0)
    plan = b.plan([vm(1, 0.2, refaults=500)], 1000, FreeState.SOFT, now=1.0)[1]
    assert plan.refault_rate == pytest.approx(500) and plan.backed_off  # 500/s > 2 % of N


def test_free_memory_beyond_high_deflates_most_entitled_first() -> None:
    """need < 0 (free memory beyond the high threshold): balloons give back, the VM with the
    highest rho first; with need = 0 they hold."""
    b = Balancer()
    busy = vm(1, 0.9, balloon=1000, allocated=5000)
    idle = vm(2, 0.1, balloon=1000, allocated=5000)
    plan = b.plan([busy, idle], -1500, FreeState.HIGH, now=0.0)
    assert plan[1].balloon_target == 0 and plan[2].balloon_target == 500
    hold = b.plan([busy, idle], 0, FreeState.HIGH, now=1.0)
    assert hold[1].balloon_target == 1000 and hold[2].balloon_target == 1000
    assert hold[1].swap_target == 0 and hold[1].reclaim == 0


def test_reclaim_never_exceeds_what_vms_hold() -> None:
    plan = Balancer().plan([vm(1, 0.5, allocated=100)], 10_000, FreeState.HARD, now=0.0)
    assert plan[1].reclaim <= 100 and plan[1].target_pages >= 0
