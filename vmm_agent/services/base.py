"""What every agent-side service does with a batch: common checks, its filter, invalidation."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from shared.constants import PageStatus, ServiceType

from ..exposure import ExposureTable


class AgentService:
    """Processes one PageList of its type: writes a status per page, stops exposing accepted."""

    service: ServiceType

    def __init__(self, exposure: ExposureTable) -> None:
        self.exposure = exposure

    def filter(self, bpns: npt.NDArray[np.int64], status: npt.NDArray[np.uint8]) -> None:
        """Service-specific refusals, written into ``status`` where it is still OK."""

    def process(
        self, bpns: npt.NDArray[Any], mpns: npt.NDArray[np.int64], status: npt.NDArray[np.uint8]
    ) -> npt.NDArray[np.int64]:
        """Decide every page of the batch; return the accepted BPNs (no longer exposed)."""
        idx = bpns.astype(np.int64)
        frame = self.exposure.mapped_frame(idx)  # a page hidden by sampling is still mapped
        status[:] = PageStatus.OK
        status[frame != mpns] = PageStatus.STALE_FRAME
        status[frame < 0] = PageStatus.NOT_EXPOSED
        self.filter(idx, status)
        accepted: npt.NDArray[np.int64] = idx[status == PageStatus.OK]
        self.exposure.invalidate(accepted)
        self.exposure.released_by[accepted] = self.service
        return accepted


def refuse(status: npt.NDArray[np.uint8], mask: npt.NDArray[np.bool_], why: PageStatus) -> None:
    """Set ``why`` where ``mask`` holds and no earlier check refused the page."""
    status[mask & (status == PageStatus.OK)] = why
