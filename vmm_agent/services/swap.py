"""Swap filter: never release a page pinned in translation; give touched pages a second chance."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from shared.constants import PageStatus, ServiceType

from .base import AgentService, refuse


class SwapFilter(AgentService):
    service = ServiceType.SWAP

    def filter(self, bpns: npt.NDArray[np.int64], status: npt.NDArray[np.uint8]) -> None:
        refuse(status, self.exposure.pinned[bpns] > 0, PageStatus.BUSY)
        # CLOCK's second chance: a page the guest touched since the last pass stays, and
        # loses its accessed bit, so the next pass may take it if it stays cold.
        touched = self.exposure.accessed[bpns]
        refuse(status, touched, PageStatus.REFERENCED)
        self.exposure.accessed[bpns] = False
