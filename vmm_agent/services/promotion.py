"""2M-promotion filter: a region is released whole or not at all.

A PROMOTION_2M batch holds whole 2 MB regions (512 pages each, in order). A page pinned in
translation is refused (BUSY), and then so is every other page of its region: the platform
can only copy a region whose 512 pages it holds (Linux's khugepaged gives up a collapse when
one page has an extra reference), and a region released in part would only cost the guest
faults for nothing. The pages of a released region come back on the new run through a
VALIDATION batch, which maps the region large once all of it is installed.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from shared.constants import PAGES_PER_2M, PageStatus, ServiceType

from .base import AgentService, refuse


class PromotionFilter(AgentService):
    service = ServiceType.PROMOTION_2M

    def filter(self, bpns: npt.NDArray[np.int64], status: npt.NDArray[np.uint8]) -> None:
        refuse(status, self.exposure.pinned[bpns] > 0, PageStatus.BUSY)
        bad = status != PageStatus.OK
        if not bad.any():
            return  # the common case: every region goes whole, nothing to look up
        regions = bpns // PAGES_PER_2M
        refuse(status, np.isin(regions, regions[bad]), PageStatus.BUSY)
