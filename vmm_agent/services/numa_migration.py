"""NUMA-migration filter: never release a page pinned in translation (its frame is in use).

The accepted pages are released like any other batch's; the platform copies them to frames
of the VM's home node, and a VALIDATION batch later hands the new frames back
(``validation.py``).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from shared.constants import PageStatus, ServiceType

from .base import AgentService, refuse


class NumaMigrationFilter(AgentService):
    service = ServiceType.NUMA_MIGRATION

    def filter(self, bpns: npt.NDArray[np.int64], status: npt.NDArray[np.uint8]) -> None:
        refuse(status, self.exposure.pinned[bpns] > 0, PageStatus.BUSY)
