"""The per-VM p2m: BPN → frame, swap slot, state and in-flight op, as NumPy arrays.

A few bytes per guest page and never a Python object per page: every service selects,
filters and updates batches of BPNs with vectorised operations on these arrays.
"""

from __future__ import annotations

import numpy as np

from shared.constants import NO_FRAME, PageState

NO_OP = 0xFF
NO_SLOT = -1

#: p2m flag: the frame is shared read-only (a write must copy it first).
FLAG_SHARED = 1
#: p2m flag: page sharing merged this page into its shared frame (with FLAG_SHARED). Tells
#: merged pages from untouched ones that a read mapped to the zero frame.
FLAG_MERGED = 2


class P2M:
    """Mapping state of every page of one VM."""

    def __init__(self, guest_pages: int) -> None:
        self.guest_pages = guest_pages
        self.frame = np.full(guest_pages, NO_FRAME, dtype=np.int64)
        self.state = np.zeros(guest_pages, dtype=np.uint8)
        self.op = np.full(guest_pages, NO_OP, dtype=np.uint8)
        self.swap_slot = np.full(guest_pages, NO_SLOT, dtype=np.int64)
        self.flags = np.zeros(guest_pages, dtype=np.uint8)
        # Incremented each time a page's in-flight op starts, so an async completion can tell
        # whether the page it worked on was cancelled (and maybe restarted) in the meantime.
        self.epoch = np.zeros(guest_pages, dtype=np.uint32)

    def counts(self) -> dict[str, int]:
        """Pages by state (a scan: for scrapes and status, not hot paths)."""
        counts = np.bincount(self.state, minlength=len(PageState))
        return {s.name.lower(): int(counts[s]) for s in PageState}
