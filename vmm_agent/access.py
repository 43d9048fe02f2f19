"""Access streams: which BPN a vCPU touches next, generated a chunk at a time with NumPy."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from shared.workload import Phase

CHUNK = 1024


class AccessStream:
    """Endless BPNs for one vCPU under one phase, plus read/write and content choices."""

    def __init__(self, phase: Phase, guest_pages: int, vcpu: int, vcpus: int, seed: int) -> None:
        self.phase = phase
        self.rng = np.random.default_rng([seed, phase.seed, vcpu])
        self.first = min(int(phase.offset * guest_pages), guest_pages - 1)
        self.size = max(1, min(int(phase.working_set * guest_pages), guest_pages - self.first))
        if phase.distribution == "zipf":
            ranks = np.arange(1, self.size + 1, dtype=np.float64)
            weights = ranks**-phase.zipf_s
            self.cdf = np.cumsum(weights) / weights.sum()
            # Hot pages spread over the working set (same order on every vCPU of this VM).
            self.perm = np.random.default_rng([seed, phase.seed]).permutation(self.size)
        # Sequential: each vCPU walks its own stripe of the working set.
        stripe = max(1, self.size // vcpus)
        self.cursor = (vcpu * stripe) % self.size
        mix = phase.content
        self.kind_cdf = np.cumsum([mix.zero, mix.duplicate, mix.unique])

    def chunk(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
        """(bpns, is_write, content kind) for the next CHUNK accesses."""
        ph, rng = self.phase, self.rng
        if ph.distribution == "uniform":
            offs = rng.integers(0, self.size, CHUNK)
        elif ph.distribution == "zipf":
            offs = self.perm[
                np.minimum(np.searchsorted(self.cdf, rng.random(CHUNK)), self.size - 1)
            ]
        else:
            offs = (self.cursor + np.arange(CHUNK)) % self.size
            self.cursor = int((self.cursor + CHUNK) % self.size)
        writes = rng.random(CHUNK) < ph.write_ratio
        kinds = np.searchsorted(self.kind_cdf, rng.random(CHUNK) * self.kind_cdf[-1], side="right")
        return (offs + self.first).astype(np.int64), writes, np.minimum(kinds, 2).astype(np.int64)
