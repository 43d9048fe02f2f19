"""Remap validation: install the new frames of pages a remap (NUMA migration) moved.

The batch's ``mpn`` is the frame to map, not the one mapped now: no page is released, pages
are exposed. The monitor maps a page only if it does not map it already (a fault may have
got there first: CANCELLED) and migration was the last service to take it from the guest
(otherwise something else, the balloon, took it since: STALE_FRAME). Pages are private, so
they are mapped writable; a page watched by the working-set sample is installed hidden.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from shared.constants import PageStatus, ServiceType

from ..exposure import NOT_RELEASED
from .base import AgentService, refuse

_NONE = np.empty(0, dtype=np.int64)


class ValidationFilter(AgentService):
    service = ServiceType.VALIDATION

    def process(
        self, bpns: npt.NDArray[Any], mpns: npt.NDArray[np.int64], status: npt.NDArray[np.uint8]
    ) -> npt.NDArray[np.int64]:
        idx = bpns.astype(np.int64)
        exposure = self.exposure
        status[:] = PageStatus.OK
        refuse(status, exposure.mapped_frame(idx) >= 0, PageStatus.CANCELLED)
        moved_by = exposure.released_by[idx] != ServiceType.NUMA_MIGRATION
        refuse(status, moved_by, PageStatus.STALE_FRAME)
        ok = status == PageStatus.OK
        exposure.install(idx[ok], mpns[ok], np.ones(int(np.count_nonzero(ok)), dtype=bool))
        exposure.released_by[idx[ok]] = NOT_RELEASED  # the guest has it again
        return _NONE  # nothing leaves the monitor
