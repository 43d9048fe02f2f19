"""The guest's memory content, real bytes with an expected hash per BPN.

A write stores deterministic content for (VM, BPN, version): zeros, one page of a small
duplicate corpus, or unique bytes (a fixed random page XOR a 64-bit key derived from the
triple). The expected xxh3-64 of every page is kept; every read hashes the frame and
compares. A mismatch is data loss: counted, and logged with BPN and frame.
"""

from __future__ import annotations

import struct
from collections import Counter
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

from shared.constants import PAGE_SIZE

CORPUS_PAGES = 8
_KEY = struct.Struct("<QQQ")


class Content:
    """Kinds of content a write may store."""

    ZERO = 0
    DUPLICATE = 1
    UNIQUE = 2


ZERO_PAGE = np.zeros(PAGE_SIZE, dtype=np.uint8)
ZERO_HASH = xxhash.xxh3_64_intdigest(ZERO_PAGE.data)


def corpus(seed: int = 0x5EED) -> npt.NDArray[np.uint8]:
    """The duplicate corpus: the same pages in every VM, so page sharing can find them."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(CORPUS_PAGES, PAGE_SIZE), dtype=np.uint8)


class GuestMemory:
    """Expected content of every guest page and the checks against real frames."""

    def __init__(self, vm_key: int, guest_pages: int) -> None:
        self.vm_key = vm_key
        self.expected = np.full(guest_pages, ZERO_HASH, dtype=np.uint64)
        self.version = np.zeros(guest_pages, dtype=np.uint32)
        self.kind = np.zeros(guest_pages, dtype=np.uint8)
        #: Pages whose content the guest expects to read back: written, and not given away
        #: since (a page given to the balloon is forgotten, ``forget``).
        self.held = np.zeros(guest_pages, dtype=bool)
        #: Pages read while not held (never written, or given away): the platform backs them
        #: with a zero page, which page sharing can merge like a written zero page.
        self.read_unheld = np.zeros(guest_pages, dtype=bool)
        #: Corpus page each DUPLICATE page holds (-1 for other kinds).
        self.corpus_index = np.full(guest_pages, -1, dtype=np.int8)
        self.corpus = corpus()
        self.corpus_hash = [xxhash.xxh3_64_intdigest(p) for p in self.corpus]
        base = np.random.default_rng(vm_key).integers(0, 2**63, size=PAGE_SIZE // 8)
        self._base = base.astype(np.uint64)
        self.mismatches = 0
        self.verified = 0
        self.mismatch_log: list[dict[str, int]] = []
        #: Guest accesses not done because the page could not be brought in (its fault
        #: failed), by error code: a read not done was not checked (it neither matched nor not).
        self.accesses_failed: Counter[str] = Counter()

    def unique_page(self, bpn: int, version: int) -> npt.NDArray[np.uint64]:
        key = xxhash.xxh3_64_intdigest(_KEY.pack(self.vm_key, bpn, version))
        return self._base ^ np.uint64(key)

    def write(
        self, frames: npt.NDArray[np.uint8], frame: int, bpn: int, kind: int, pick: int
    ) -> None:
        """Store new content for ``bpn`` into ``frame`` and remember its hash."""
        version = int(self.version[bpn]) + 1
        self.version[bpn] = version
        self.kind[bpn] = kind
        self.held[bpn] = True
        self.corpus_index[bpn] = -1
        if kind == Content.ZERO:
            frames[frame] = 0
            self.expected[bpn] = ZERO_HASH
        elif kind == Content.DUPLICATE:
            index = pick % CORPUS_PAGES
            frames[frame] = self.corpus[index]
            self.expected[bpn] = self.corpus_hash[index]
            self.corpus_index[bpn] = index
        else:
            page = self.unique_page(bpn, version)
            frames[frame] = page.view(np.uint8)
            self.expected[bpn] = xxhash.xxh3_64_intdigest(page.data)

    def check(self, frames: npt.NDArray[np.uint8], frame: int, bpn: int) -> bool:
        """Hash the frame and compare; a mismatch is counted and remembered."""
        self.verified += 1
        if not self.held[bpn]:
            self.read_unheld[bpn] = True
        if xxhash.xxh3_64_intdigest(frames[frame]) == int(self.expected[bpn]):
            return True
        self.mismatches += 1
        if len(self.mismatch_log) < 100:
            self.mismatch_log.append(
                {"bpn": bpn, "frame": frame, "version": int(self.version[bpn])}
            )
        return False

    def check_many(
        self, frames: npt.NDArray[np.uint8], mpns: npt.NDArray[Any], bpns: npt.NDArray[np.int64]
    ) -> int:
        """``check`` of many pages at once (page ``bpns[i]`` in frame ``mpns[i]``): every page
        hashed, the hashes compared in one step; returns the mismatches (counted and
        remembered as ``check`` does)."""
        n = len(bpns)
        self.verified += n
        self.read_unheld[bpns[~self.held[bpns]]] = True
        flat = frames.reshape(-1).data.cast("B")
        offsets = (np.asarray(mpns, dtype=np.int64) * PAGE_SIZE).tolist()
        pages = [flat[o : o + PAGE_SIZE] for o in offsets]
        sums = np.fromiter(map(xxhash.xxh3_64_intdigest, pages), np.uint64, n)
        bad = np.flatnonzero(sums != self.expected[bpns]).tolist()
        self.mismatches += len(bad)
        for i in bad[: max(0, 100 - len(self.mismatch_log))]:
            bpn = int(bpns[i])
            self.mismatch_log.append(
                {"bpn": bpn, "frame": int(mpns[i]), "version": int(self.version[bpn])}
            )
        return len(bad)

    def forget(self, bpns: npt.NDArray[np.int64]) -> None:
        """The guest gave these pages away (to the balloon): it expects nothing of them any
        more. The platform frees what backed them; their next touch finds a zero page."""
        self.held[bpns] = False
        self.read_unheld[bpns] = False  # not backed until touched again
        self.expected[bpns] = ZERO_HASH
        self.kind[bpns] = Content.ZERO
        self.corpus_index[bpns] = -1

    def written_pages(self) -> npt.NDArray[np.int64]:
        """BPNs whose content the guest wrote and still holds (what verification reads)."""
        return np.flatnonzero(self.held).astype(np.int64)

    def content_profile(self) -> dict[str, Any]:
        """What the backed pages hold: zero pages (written as zero, or read before any write,
        which the platform backs with zeros), and pages of each corpus page.

        Unique pages differ from every other page (their bytes depend on VM, BPN and
        version), so these counts are all the load generator needs to know how many pages
        page sharing could merge, across VMs.
        """
        written = self.held
        per_corpus = np.bincount(
            self.corpus_index[written & (self.corpus_index >= 0)], minlength=CORPUS_PAGES
        )
        backed_zero = (written & (self.kind == Content.ZERO)) | (~written & self.read_unheld)
        return {
            "zero": int(np.count_nonzero(backed_zero)),
            "corpus": per_corpus.tolist(),
            "unique": int(np.count_nonzero(written & (self.kind == Content.UNIQUE))),
        }

    def summary(self) -> dict[str, Any]:
        return {
            "pages_verified": self.verified,
            "mismatches": self.mismatches,
            "accesses_failed": dict(self.accesses_failed),
        }
