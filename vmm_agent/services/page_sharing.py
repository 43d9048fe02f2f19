"""Page-sharing filter: never release a page pinned in translation (its frame is in use)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from shared.constants import PageStatus, ServiceType

from .base import AgentService, refuse


class PageSharingFilter(AgentService):
    service = ServiceType.PAGE_SHARING

    def filter(self, bpns: npt.NDArray[np.int64], status: npt.NDArray[np.uint8]) -> None:
        refuse(status, self.exposure.pinned[bpns] > 0, PageStatus.BUSY)
