"""2 MB mappings on the platform side: the p2m's large flag, splitting, coverage.

A 2 MB guest region (512 aligned BPNs) is *large* when 2M promotion copied it into one
aligned 2 MiB run of frames: every page of the region carries ``FLAG_LARGE`` in the p2m and
page ``i`` of the region sits on frame ``run + i``. The VMM maps such a region with one large
mapping once it has installed all its pages (``vmm_agent/exposure.py``).

Splitting (Linux's ``split_huge_pmd`` before a subpage is unmapped, swapped, migrated or
merged by KSM): a release service that takes any page of a large region ends the large
mapping of the whole region first, on both sides. Here that is ``split``, called where a
page stops being the VMM's or changes frame: ``PlatformService.mark_in_flight`` (every
release batch: swap, page retire, page sharing, NUMA migration, defrag), page retire's move
of an unmapped page (given another frame without a batch) and the balloon's completion.
The agent does the same in ``ExposureTable.invalidate``, which every release on its side
goes through. The frames stay where they are: the region is just 512 small pages again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from shared.constants import PAGES_PER_2M
from shared.distinct import distinct

if TYPE_CHECKING:
    from .p2m import P2M
    from .vm import VM

#: p2m flag: the page belongs to a large region (see the module docstring). Bits 1 and 2
#: are FLAG_SHARED and FLAG_MERGED (``p2m.py``).
FLAG_LARGE = 4
_NOT_LARGE = 0xFF & ~FLAG_LARGE


def large_regions(p2m: P2M, bpns: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    """The large regions (region numbers) that pages ``bpns`` belong to, each once."""
    idx = np.asarray(bpns, dtype=np.int64)
    if len(idx) == 0:
        return np.empty(0, dtype=np.int64)
    hit = idx[(p2m.flags[idx] & FLAG_LARGE) != 0]
    if len(hit) == 0:
        return np.empty(0, dtype=np.int64)
    regions: npt.NDArray[np.int64] = distinct(hit // PAGES_PER_2M)
    return regions


def region_pages(regions: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Every BPN of ``regions``, region by region."""
    pages: npt.NDArray[np.int64] = (
        regions[:, None] * PAGES_PER_2M + np.arange(PAGES_PER_2M, dtype=np.int64)
    ).ravel()
    return pages


def region_rows(per_page: npt.NDArray[Any], regions: npt.NDArray[np.int64]) -> npt.NDArray[Any]:
    """``per_page[region_pages(regions)]`` as one row of 512 per region (a copy), gathered a
    row at a time: a copy of 512 entries per region, where an index per page costs building
    the index and a lookup per entry (a 64-region scan of the p2m: several times cheaper).
    Only whole regions: ``regions`` below ``len(per_page) // 512``."""
    whole = len(per_page) // PAGES_PER_2M
    rows: npt.NDArray[Any] = per_page[: whole * PAGES_PER_2M].reshape(whole, PAGES_PER_2M)[regions]
    return rows


def split(vm: VM, bpns: npt.NDArray[Any]) -> int:
    """End the large mapping of every region ``bpns`` touch; returns how many were split.

    Cheap when nothing is large: one masked read of the batch's flags.
    """
    regions = large_regions(vm.p2m, bpns)
    if len(regions) == 0:
        return 0
    pages = region_pages(regions)
    vm.p2m.flags[pages] &= _NOT_LARGE
    vm.stats.hugepage_splits += len(regions)
    return len(regions)


def coverage(p2m: P2M) -> tuple[int, int]:
    """(large regions, whole regions) of a VM: a read of one flag per region (for status and
    scrapes)."""
    regions = p2m.guest_pages // PAGES_PER_2M
    firsts = p2m.flags[: regions * PAGES_PER_2M : PAGES_PER_2M]
    return int(np.count_nonzero(firsts & FLAG_LARGE)), regions
