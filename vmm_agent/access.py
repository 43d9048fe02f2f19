"""Access streams: which BPN a vCPU touches next, generated a chunk at a time with NumPy.

An access is anonymous (a page of the working set, read or written) or, when the phase has
a page cache (``cache_ratio`` > 0), a read of a file block through the guest's page cache;
the guest model (``guest_os.py``) decides which page holds the block.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from shared.workload import Phase

CHUNK = 1024


class Chunk(NamedTuple):
    """The next CHUNK accesses of a vCPU."""

    bpns: npt.NDArray[np.int64]
    writes: npt.NDArray[np.bool_]
    kinds: npt.NDArray[np.int64]
    #: The file block each access reads through the page cache, -1 for an anonymous access;
    #: None when the phase has no page-cache reads (every access is anonymous).
    blocks: npt.NDArray[np.int64] | None


class _Offsets:
    """Offsets in ``[0, size)`` drawn by a phase's distribution."""

    def __init__(self, phase: Phase, size: int, perm_seed: list[int], start: int) -> None:
        self.phase = phase
        self.size = size
        if phase.distribution == "zipf":
            self.cdf, self.perm = _zipf_table(size, phase.zipf_s, tuple(perm_seed))
        self.cursor = start % size

    def draw(self, rng: np.random.Generator, n: int) -> npt.NDArray[np.int64]:
        ph = self.phase
        if ph.distribution == "uniform":
            offs: npt.NDArray[np.int64] = rng.integers(0, self.size, n)
            return offs
        if ph.distribution == "zipf":
            ranks = np.minimum(np.searchsorted(self.cdf, rng.random(n)), self.size - 1)
            zipf: npt.NDArray[np.int64] = self.perm[ranks]
            return zipf
        seq = (self.cursor + np.arange(n, dtype=np.int64)) % self.size
        self.cursor = int((self.cursor + n) % self.size)
        return seq


@lru_cache(maxsize=8)
def _zipf_table(
    size: int, exponent: float, perm_seed: tuple[int, ...]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """The CDF of Zipf ranks over ``size`` offsets and the permutation that spreads the hot
    ranks over the range (same order on every vCPU of a VM).

    Built once and shared, read-only, by every vCPU of the phase: 16 B per page each, which
    per vCPU was the agent's largest cost per guest page.
    """
    ranks = np.arange(1, size + 1, dtype=np.float64)
    weights = ranks**-exponent
    cdf = np.cumsum(weights) / weights.sum()
    perm = np.random.default_rng(list(perm_seed)).permutation(size)
    cdf.flags.writeable = False
    perm.flags.writeable = False
    return cdf, perm


class AccessStream:
    """Endless BPNs for one vCPU under one phase, plus read/write and content choices."""

    def __init__(self, phase: Phase, guest_pages: int, vcpu: int, vcpus: int, seed: int) -> None:
        self.phase = phase
        self.rng = np.random.default_rng([seed, phase.seed, vcpu])
        self.first = min(int(phase.offset * guest_pages), guest_pages - 1)
        self.size = max(1, min(int(phase.working_set * guest_pages), guest_pages - self.first))
        # Sequential: each vCPU walks its own stripe of the working set.
        stripe = max(1, self.size // vcpus)
        self.anon = _Offsets(phase, self.size, [seed, phase.seed], vcpu * stripe)
        mix = phase.content
        self.kind_cdf = np.cumsum([mix.zero, mix.duplicate, mix.unique])
        self.blocks: _Offsets | None = None
        if phase.cache_ratio > 0:
            nblocks = cache_blocks(phase, guest_pages)
            start = vcpu * max(1, nblocks // vcpus)
            self.blocks = _Offsets(phase, nblocks, [seed, phase.seed, 0xCA], start)

    def chunk(self) -> Chunk:
        """(bpns, is_write, content kind, cache blocks) for the next CHUNK accesses."""
        ph, rng = self.phase, self.rng
        offs = self.anon.draw(rng, CHUNK)
        writes = rng.random(CHUNK) < ph.write_ratio
        kinds = np.searchsorted(self.kind_cdf, rng.random(CHUNK) * self.kind_cdf[-1], side="right")
        bpns = (offs + self.first).astype(np.int64)
        kinds = np.minimum(kinds, 2).astype(np.int64)
        if self.blocks is None:
            return Chunk(bpns, writes, kinds, None)
        # Page-cache accesses are reads; their BPN is chosen by the page cache.
        cached = rng.random(CHUNK) < ph.cache_ratio
        blocks = np.full(CHUNK, -1, dtype=np.int64)
        blocks[cached] = self.blocks.draw(rng, int(np.count_nonzero(cached)))
        writes &= ~cached
        return Chunk(bpns, writes, kinds, blocks)


def cache_blocks(phase: Phase, guest_pages: int) -> int:
    """File blocks a phase reads through the page cache: as many as the cache may hold."""
    return max(1, int(phase.cache * guest_pages))
