"""The agent's exposure table: which frame the guest may touch for each BPN, and how.

NumPy arrays indexed by BPN: frame (-1 when not exposed), writable, an accessed bit the
vCPUs set on every touch (the swap filter's second chance), and a pin count for pages "in
translation" that no release may take.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from shared.constants import NO_FRAME

NOT_RELEASED = 0xFF


class ExposureTable:
    """BPN → (frame, writable) plus accessed and pinned state."""

    def __init__(self, guest_pages: int) -> None:
        self.guest_pages = guest_pages
        self.frame = np.full(guest_pages, NO_FRAME, dtype=np.int64)
        self.writable = np.zeros(guest_pages, dtype=bool)
        self.accessed = np.zeros(guest_pages, dtype=bool)
        self.pinned = np.zeros(guest_pages, dtype=np.uint16)
        #: The service that last took each page from the guest (NOT_RELEASED: none since reset).
        self.released_by = np.full(guest_pages, NOT_RELEASED, dtype=np.uint8)

    def install(
        self, bpns: npt.NDArray[Any], frames: npt.NDArray[Any], writable: npt.NDArray[Any]
    ) -> None:
        """Expose pages as the platform mapped them."""
        idx = bpns.astype(np.int64)
        self.frame[idx] = frames
        self.writable[idx] = writable

    def invalidate(self, bpns: npt.NDArray[Any]) -> None:
        """Stop exposing pages (they are handed to the platform)."""
        self.frame[bpns] = NO_FRAME
        self.writable[bpns] = False

    def exposed_count(self) -> int:
        return int(np.count_nonzero(self.frame != NO_FRAME))
