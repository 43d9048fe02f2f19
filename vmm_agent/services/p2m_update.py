"""p2mUpdate filter: only pages the VMM maps shared (read-only) have a mapping to drop."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from shared.constants import PageStatus, ServiceType

from .base import AgentService, refuse


class P2MUpdateFilter(AgentService):
    service = ServiceType.P2M_UPDATE

    def filter(self, bpns: npt.NDArray[np.int64], status: npt.NDArray[np.uint8]) -> None:
        refuse(status, self.exposure.mapped_writable(bpns), PageStatus.NOT_SHARED)
