"""Which guest pages were touched, and in which sampling period (the truth for sampling).

Every guest access stamps its page with the current period (one int32 store, the same cost
as the boolean it replaces). The monitor advances the period when a new working-set sample
arrives; the pages stamped with a period are exactly the pages the guest touched while it
was current, which the load generator compares with the sampled estimate.
"""

from __future__ import annotations

import numpy as np


class TouchLog:
    """Per-page stamp of the last period in which the guest touched the page (0: never)."""

    def __init__(self, guest_pages: int) -> None:
        self.stamp = np.zeros(guest_pages, dtype=np.int32)
        #: The stamp accesses write now (periods start at 1).
        self.current = 1

    def advance(self) -> int:
        """Start a new period; returns the number of distinct pages touched in the last one."""
        finished = int(np.count_nonzero(self.stamp == self.current))
        self.current += 1
        return finished

    def distinct(self) -> int:
        """Distinct pages the guest ever touched."""
        return int(np.count_nonzero(self.stamp))
