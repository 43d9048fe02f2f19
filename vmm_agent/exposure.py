"""The agent's exposure table: which frame the guest may touch for each BPN, and how.

NumPy arrays indexed by BPN: frame (-1 when not exposed), writable, an accessed bit the
vCPUs set on every touch (the swap filter's second chance), and a pin count for pages "in
translation" that no release may take.

A page can also be *hidden*: the monitor keeps its mapping (``hidden``) but does not let
the guest use it, so the next guest touch traps in the monitor's fault path, which puts the
mapping back without asking the platform. Working-set sampling hides the pages it watches
this way (``watched``). For the platform a hidden page is still exposed: release batches
treat the hidden mapping as the monitor's mapping.

Why ``hidden`` is a dict and not two more columns: only the pages of the current sample can
be hidden (``sample_pages``, 100 by default, against millions of guest pages), so per-page
columns cost 9 B per guest page (issue 10's 24 B budget) to hold a few hundred entries. The
invariant that keeps batch operations vectorised: **every hidden page is watched and not
visible** (``hide`` marks its pages watched; the fault path unhides a watched page in the
same step that stops watching it; a new sample gives back every hidden mapping of the old
one, ``unhide_all`` walking the dict itself; ballooning invalidates before it stops
watching). So a batch looks up the dict only for its watched pages, one NumPy gather finds
them, and a page that is not watched never needs a dict operation (the single-page fault
reply's fast path). ``stray_hidden`` checks it.

Large mappings: ``large[r]`` says the monitor maps 2 MB region ``r`` (BPNs ``512r ..
512r+511``) with one large mapping, which it does once 2M promotion moved the region into
one aligned run, every page of it is installed there and the platform says the region is
large (``arm_large``, called by validation for the regions the platform marked). Guest accesses
still go through ``frame`` page by page (the model checks every page's content). Any
release of a page of a large region splits the mapping first (``invalidate``), as the
platform does in its p2m (``platform_daemon/hugepages.py``); ``splits`` counts them. Hiding a
page for working-set sampling does not split: it is a monitor-only trap, not a release.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from shared.constants import NO_FRAME, PAGES_PER_2M
from shared.distinct import distinct

NOT_RELEASED = 0xFF


class ExposureTable:
    """BPN → (frame, writable) plus accessed, pinned, hidden and watched state."""

    def __init__(self, guest_pages: int) -> None:
        self.guest_pages = guest_pages
        self.frame = np.full(guest_pages, NO_FRAME, dtype=np.int64)
        self.writable = np.zeros(guest_pages, dtype=bool)
        self.accessed = np.zeros(guest_pages, dtype=bool)
        self.pinned = np.zeros(guest_pages, dtype=np.uint16)
        #: The service that last took each page from the guest (NOT_RELEASED: none since reset).
        self.released_by = np.full(guest_pages, NOT_RELEASED, dtype=np.uint8)
        #: BPN -> (frame, writable) of the hidden mappings (module docstring: a subset of watched).
        self.hidden: dict[int, tuple[int, bool]] = {}
        #: Pages of the current working-set sample not touched since they were armed.
        self.watched = np.zeros(guest_pages, dtype=bool)
        #: Whole 2 MB regions mapped large, and how many large mappings were split.
        self.large = np.zeros(guest_pages // PAGES_PER_2M, dtype=bool)
        self.splits = 0

    def install(
        self, bpns: npt.NDArray[Any], frames: npt.NDArray[Any], writable: npt.NDArray[Any]
    ) -> None:
        """Expose pages as the platform mapped them (watched ones stay hidden)."""
        idx = bpns.astype(np.int64)
        watched = self.watched[idx]
        if watched.any():
            self._keep_hidden(idx[watched], frames[watched], writable[watched])
            idx, frames, writable = idx[~watched], frames[~watched], writable[~watched]
        # The others are not watched, so they have no hidden mapping to replace.
        self.frame[idx] = frames
        self.writable[idx] = writable

    def invalidate(self, bpns: npt.NDArray[Any]) -> None:
        """Stop exposing pages (they are handed to the platform), hidden mappings included;
        a large mapping that covers one of them is split first."""
        self.split(bpns)
        self.frame[bpns] = NO_FRAME
        self.writable[bpns] = False
        if self.hidden:
            drop = self.hidden.pop
            for bpn in bpns[self.watched[bpns]].tolist():
                drop(bpn, None)

    def split(self, bpns: npt.NDArray[Any]) -> int:
        """End the large mappings of the regions ``bpns`` touch; returns how many."""
        regions = np.asarray(bpns, dtype=np.int64) // PAGES_PER_2M
        regions = regions[regions < len(self.large)]
        hit = distinct(regions[self.large[regions]])
        self.large[hit] = False
        self.splits += len(hit)
        return len(hit)

    def arm_large(self, regions: npt.NDArray[np.int64]) -> int:
        """Map large every region of ``regions`` whose 512 pages are installed, writable, on
        one aligned run in order (frame of page i = run + i); returns how many were armed.

        The condition is what a 2 MB page table entry can express. It is not enough to
        know the region is still large: the platform may split it without a batch (a
        swap-out of a page not mapped yet that failed keeps the order), so the caller passes
        only regions the platform marked large (``services/validation.py``).
        """
        regions = distinct(regions[regions < len(self.large)])
        if len(regions) == 0:
            return 0
        pages = regions[:, None] * PAGES_PER_2M + np.arange(PAGES_PER_2M, dtype=np.int64)
        frames = self.mapped_frame(pages.ravel()).reshape(pages.shape)
        writable = self.mapped_writable(pages.ravel()).reshape(pages.shape)
        base = frames[:, :1]
        ok = (base[:, 0] >= 0) & (base[:, 0] % PAGES_PER_2M == 0) & writable.all(axis=1)
        ok &= (frames == base + np.arange(PAGES_PER_2M)).all(axis=1)
        armed = regions[ok & ~self.large[regions]]
        self.large[armed] = True
        return len(armed)

    def coverage(self) -> float:
        """Fraction of guest memory mapped large."""
        return float(np.count_nonzero(self.large)) * PAGES_PER_2M / max(1, self.guest_pages)

    def hide(self, bpns: npt.NDArray[np.int64]) -> None:
        """Keep the mappings of ``bpns`` in the monitor only: the next touch traps. The
        hidden pages are watched (the invariant in the module docstring)."""
        mapped = bpns[self.frame[bpns] >= 0]
        self.watched[mapped] = True
        self._keep_hidden(mapped, self.frame[mapped], self.writable[mapped])
        self.frame[mapped] = NO_FRAME
        self.writable[mapped] = False

    def _keep_hidden(
        self, bpns: npt.NDArray[Any], frames: npt.NDArray[Any], writable: npt.NDArray[Any]
    ) -> None:
        mappings = zip(frames.tolist(), np.asarray(writable, dtype=bool).tolist(), strict=True)
        self.hidden.update(zip(bpns.tolist(), mappings, strict=True))

    def unhide(self, bpn: int) -> bool:
        """Give the guest back a hidden mapping; False when the page had none."""
        entry = self.hidden.pop(bpn, None)
        if entry is None:
            return False
        self.frame[bpn], self.writable[bpn] = entry
        return True

    def unhide_all(self, bpns: npt.NDArray[np.int64]) -> None:
        """``unhide`` for every page of ``bpns`` that has a hidden mapping, at once. Walks the
        dict (the current sample at most), not ``bpns``: it does not rely on ``watched``."""
        if not self.hidden:
            return
        keys = np.fromiter(self.hidden, dtype=np.int64, count=len(self.hidden))
        back = keys[np.isin(keys, bpns)].tolist()
        entries = [self.hidden.pop(bpn) for bpn in back]
        self.frame[back] = [frame for frame, _ in entries]
        self.writable[back] = [writable for _, writable in entries]

    def _hidden_at(self, idx: npt.NDArray[np.int64]) -> tuple[list[int], list[tuple[int, bool]]]:
        """Positions in ``idx`` of pages with a hidden mapping, and those mappings: only the
        watched pages of ``idx`` are looked up (a few, or none, in a batch)."""
        positions: list[int] = []
        entries: list[tuple[int, bool]] = []
        if not self.hidden:
            return positions, entries
        pos = self.watched[idx].nonzero()[0]  # cheaper than np.flatnonzero on short arrays
        get = self.hidden.get
        for p, bpn in zip(pos.tolist(), idx[pos].tolist(), strict=True):
            entry = get(bpn)
            if entry is not None:
                positions.append(p)
                entries.append(entry)
        return positions, entries

    def mapped_frame(self, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """The monitor's mapping of each page, hidden or not (NO_FRAME: not mapped)."""
        frame: npt.NDArray[np.int64] = self.frame[idx]
        positions, entries = self._hidden_at(idx)
        if positions:
            frame[positions] = [f for f, _ in entries]
        return frame

    def mapped_writable(self, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        writable: npt.NDArray[np.bool_] = self.writable[idx]
        positions, entries = self._hidden_at(idx)
        if positions:
            writable[positions] = [w for _, w in entries]
        return writable

    def mapped_in(self, start: int, end: int) -> npt.NDArray[np.bool_]:
        """Which BPNs of ``start:end`` the monitor maps, hidden or not."""
        mapped: npt.NDArray[np.bool_] = self.frame[start:end] >= 0
        for pos in self.watched[start:end].nonzero()[0].tolist():
            if start + pos in self.hidden:
                mapped[pos] = True
        return mapped

    def stray_hidden(self) -> list[int]:
        """Hidden pages that break the invariant (not watched, or visible too): none."""
        return [b for b in self.hidden if not self.watched[b] or self.frame[b] >= 0]

    def exposed_count(self) -> int:
        return int(np.count_nonzero(self.frame != NO_FRAME))
