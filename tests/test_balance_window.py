"""Guest impact is judged over a window of at least ``impact_window_seconds``: balances that
come closer together (forced by a change of free state or of the host limit) do not turn a
brief stall into a large fraction and a back-off."""

from __future__ import annotations

import pytest

from platform_daemon.balance import BalanceConfig, Balancer, VMState
from shared.constants import FreeState

N = 10_000


def vm(stall_seconds: float) -> VMState:
    return VMState(1, 1000, N, N, 0.2, balloon=0, swapped=0, stall_seconds=stall_seconds)


def test_a_brief_stall_between_close_balances_is_no_backoff() -> None:
    """50 ms stalled within 0.1 s is 50 % of that tenth of a second, but 5 % of the second:
    no back-off; the figures shown are those of the last complete window."""
    b = Balancer(BalanceConfig(impact_stall_fraction=0.1, impact_window_seconds=1.0))
    b.plan([vm(0.0)], 1000, FreeState.SOFT, now=0.0)
    close = b.plan([vm(0.05)], 1000, FreeState.SOFT, now=0.1)[1]
    assert not close.backed_off and close.stall_fraction == 0.0  # no window complete yet
    second = b.plan([vm(0.05)], 1000, FreeState.SOFT, now=1.0)[1]
    assert not second.backed_off and second.stall_fraction == pytest.approx(0.05)


def test_a_long_stall_backs_off_once_its_window_is_complete() -> None:
    b = Balancer(BalanceConfig(impact_stall_fraction=0.1, impact_window_seconds=1.0))
    b.plan([vm(0.0)], 1000, FreeState.SOFT, now=0.0)
    assert not b.plan([vm(0.3)], 1000, FreeState.SOFT, now=0.5)[1].backed_off
    hurt = b.plan([vm(0.6)], 1000, FreeState.SOFT, now=1.2)[1]
    assert hurt.backed_off and hurt.stall_fraction == pytest.approx(0.5)
