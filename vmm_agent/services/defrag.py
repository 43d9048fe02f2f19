"""2M-defrag filter: never release a page pinned in translation (its frame is in use).

The platform moves the accepted pages out of the 2 MiB run it is emptying, and a VALIDATION
batch later hands the new frames back (``validation.py``), as for NUMA migration.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from shared.constants import PageStatus, ServiceType

from .base import AgentService, refuse


class DefragFilter(AgentService):
    service = ServiceType.DEFRAG_2M

    def filter(self, bpns: npt.NDArray[np.int64], status: npt.NDArray[np.uint8]) -> None:
        refuse(status, self.exposure.pinned[bpns] > 0, PageStatus.BUSY)
