"""Remap validation: install the new frames of pages a remap (NUMA migration, 2M defrag,
2M promotion) moved.

The batch's ``mpn`` is the frame to map, not the one mapped now: no page is released, pages
are exposed. The monitor maps a page only if it does not map it already (a fault may have
got there first: CANCELLED) and a remapping service was the last to take it from the guest
(otherwise something else, the balloon, took it since: STALE_FRAME). Pages are private, so
they are mapped writable; a page watched by the working-set sample is installed hidden.
The daemon marks the pages of regions its p2m says are large (status byte LARGE, which the
monitor reads before writing its verdict); such a region is then mapped large once all its
pages are in place on their run. Frame order alone is not enough: a region the daemon split
without a batch (a swap-out of a page not mapped yet that failed, or came back on the same
frame) still lies on its run in order.

Swap read-ahead validation shares the batch type: a page the monitor maps at the batch's
MPN that swap was the last to take is a read-ahead page a swap-in reply mapped. Its accessed
bit says whether the guest touched it since (the swap filter takes only pages whose bit is
clear, and nothing sets it but a guest touch, which needs the mapping): REFERENCED keeps
it; UNTOUCHED releases it back to swap (the platform frees the frame, the slot holds the
page); a pinned one is BUSY and kept. ``platform_daemon/services/readahead.py`` has the why.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from shared.constants import PAGES_PER_2M, PageStatus, ServiceType
from shared.distinct import difference

from ..exposure import NOT_RELEASED
from .base import AgentService, refuse

_NONE = np.empty(0, dtype=np.int64)
#: Services whose pages come back through remap validation.
REMAPS = np.array(
    [ServiceType.NUMA_MIGRATION, ServiceType.DEFRAG_2M, ServiceType.PROMOTION_2M], dtype=np.uint8
)


class ValidationFilter(AgentService):
    service = ServiceType.VALIDATION

    def process(
        self, bpns: npt.NDArray[Any], mpns: npt.NDArray[np.int64], status: npt.NDArray[np.uint8]
    ) -> npt.NDArray[np.int64]:
        idx = bpns.astype(np.int64)
        large = status == PageStatus.LARGE  # the daemon's word, read before any verdict
        exposure = self.exposure
        readahead = (exposure.released_by[idx] == ServiceType.SWAP) & (
            exposure.mapped_frame(idx) == mpns
        )
        if not readahead.any():
            self._remap(idx, mpns, status, large)
            return _NONE  # nothing leaves the monitor
        status[readahead] = self._validate_readahead(idx[readahead])
        rest = ~readahead
        remap_status = status[rest]
        self._remap(idx[rest], mpns[rest], remap_status, large[rest])
        status[rest] = remap_status
        return _NONE  # released read-ahead pages are the platform's business, not a release

    def _validate_readahead(self, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
        """Keep the read-ahead pages the guest touched (or pinned), release the others."""
        exposure = self.exposure
        status = np.full(len(idx), PageStatus.UNTOUCHED, dtype=np.uint8)
        status[exposure.accessed[idx]] = PageStatus.REFERENCED
        status[exposure.pinned[idx] > 0] = PageStatus.BUSY
        exposure.invalidate(idx[status == PageStatus.UNTOUCHED])  # released_by stays SWAP
        return status

    def _remap(
        self,
        idx: npt.NDArray[np.int64],
        mpns: npt.NDArray[np.int64],
        status: npt.NDArray[np.uint8],
        large: npt.NDArray[np.bool_],
    ) -> None:
        """Remap validation: install the new frames (``status`` is written in place), then
        map large the regions the daemon marked large (``large``: per page)."""
        exposure = self.exposure
        status[:] = PageStatus.OK
        refuse(status, exposure.mapped_frame(idx) >= 0, PageStatus.CANCELLED)
        released_by = exposure.released_by[idx]
        refuse(status, ~np.isin(released_by, REMAPS), PageStatus.STALE_FRAME)
        ok = status == PageStatus.OK
        exposure.install(idx[ok], mpns[ok], np.ones(int(np.count_nonzero(ok)), dtype=bool))
        exposure.released_by[idx[ok]] = NOT_RELEASED  # the guest has it again
        if large.any():
            # A region is large only while the daemon says so for every page of it this
            # batch carries: frame order alone cannot tell a region the daemon split
            # without asking the monitor (tests/test_page_life_moves.py).
            regions = idx // PAGES_PER_2M
            exposure.arm_large(difference(regions[large], regions[~large]))
