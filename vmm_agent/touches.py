"""Which guest pages were touched, and in which sampling period (the truth for sampling).

Every guest access stamps its page with the current period; the first touch of a page in a
period is also counted then (a compare and, once per page and period, a store and a count),
so ending a period costs nothing however big the guest. The monitor advances the period
when a new working-set sample arrives; the pages first touched in a period are exactly the
pages the guest touched while it was current, which the load generator compares with the
sampled estimate.
"""

from __future__ import annotations

import numpy as np


class TouchLog:
    """Per-page stamp of the last period in which the guest touched the page (0: never)."""

    def __init__(self, guest_pages: int) -> None:
        self.stamp = np.zeros(guest_pages, dtype=np.int32)
        #: The stamp accesses write now (periods start at 1).
        self.current = 1
        #: Pages touched for the first time in each period, by period (kept by the vCPUs).
        self.firsts: dict[int, int] = {}

    def touch(self, bpn: int, period: int) -> None:
        """What a vCPU does on an access (inlined in its loop): stamp and count once."""
        if self.stamp[bpn] != period:
            self.stamp[bpn] = period
            self.firsts[period] = self.firsts.get(period, 0) + 1

    def advance(self) -> int:
        """Start a new period; returns the number of distinct pages touched in the last one."""
        finished = self.firsts.pop(self.current, 0)
        self.current += 1
        return finished

    def distinct(self) -> int:
        """Distinct pages the guest ever touched."""
        return int(np.count_nonzero(self.stamp))
