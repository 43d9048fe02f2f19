"""The time bound of a low-priority round, and how a VM's latency sensitivity sets it.

The talk's low-priority callback runs ten times a second with the guest exited; its time
bound is how long it may keep the guest out. A VM's ``latency_sensitivity`` (an integer, as
ESX's ``memschedInfo.vmmem.prop.latencySensitivity``) maps to that bound: each step halves
it, so a latency-sensitive VM gives less of each 100 ms tick to background memory work.

=====================  ==========  ============================
latency_sensitivity    bound       share of one vCPU (10 Hz)
=====================  ==========  ============================
0 (default)            8 ms        8 %
1                      4 ms        4 %
2                      2 ms        2 %
3                      1 ms        1 %
4 and above            0.5 ms      0.5 %
=====================  ==========  ============================

Pure: the clock is passed in, so rounds are testable on a virtual clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

#: Seconds between two low-priority callbacks (the talk's 10 Hz).
TICK_SECONDS = 0.1
#: Bound of a VM with latency sensitivity 0, in seconds.
BASE_BOUND_SECONDS = 0.008
#: No bound is smaller than this: below it a round cannot fit one batch's round trip.
MIN_BOUND_SECONDS = 0.0005


def bound_for(latency_sensitivity: int) -> float:
    """Seconds of low-priority work per tick for a VM of this latency sensitivity."""
    if latency_sensitivity < 0:
        raise ValueError(f"latency sensitivity must be >= 0, got {latency_sensitivity}")
    shift = min(latency_sensitivity, 16)
    return max(MIN_BOUND_SECONDS, BASE_BOUND_SECONDS / (1 << shift))


@dataclass
class TimeBound:
    """The budget of one round: ``budget`` seconds from ``started`` on ``clock``."""

    budget: float
    started: float
    clock: Callable[[], float] = field(repr=False)

    def used(self) -> float:
        return self.clock() - self.started

    def left(self) -> float:
        """Seconds left (negative once overrun)."""
        return self.budget - self.used()

    def left_us(self) -> int:
        """Microseconds left, clamped to what a GetRequest carries (u32)."""
        return max(0, min(0xFFFFFFFF, int(self.left() * 1e6)))

    @property
    def expired(self) -> bool:
        return self.left() <= 0.0

    def overrun(self) -> float:
        """Seconds past the bound (0 when the round ended in time)."""
        return max(0.0, -self.left())
