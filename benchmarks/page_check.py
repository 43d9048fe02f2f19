"""Page checking's cost per page against a raw xxh3 and a raw compare of the same frames.

In process, real parts: a machine-memory file in ``/dev/shm`` twice the guest's size, the
guest's pages on frames scattered over it (a random permutation, as a long-running host's
allocator leaves them), content written by the guest model (``GuestMemory.write``, the
default phase's mix: 10 % zero, 20 % corpus, 70 % unique), every page exposed. The checker
(``vmm_agent/page_check.py``) runs turns of ``--batch`` pages, as the monitor queue calls
it, sweeping the whole guest: selection (cursor, skip rules), hashing, the compare, the
counts. Its clock is virtual so that the rate never limits it: the mechanism is measured.

Against, interleaved with the sweeps, on the very same frames in the same batches:

- ``xxh3``: ``xxh3_64_intdigest`` of each frame, nothing else (the floor of a check that
  hashes, as every guest read does);
- ``memcmp``: a NumPy gather of the batch's frames compared with a reference copy of their
  content (``(frames[f] == ref).all(axis=1)``): the floor of a check that compares bytes;
- ``regenerate``: the alternative design, vectorised: the expected bytes rebuilt per kind
  from the model (zero, corpus page, the unique page's key XOR the VM's base page) and the
  batch compared with them in NumPy.

Figures: µs per page of each, the checker over xxh3, and what the default rate (1000
pages/s: 100 pages a tick) costs per tick against the time bounds of latency sensitivity 0
(8 ms) and 4 (0.5 ms), where the checker's cap of 10 % of the bound applies.

Usage: ``python benchmarks/page_check.py [--mib 64] [--batch 100] [--repeats 5] [--json
out.json]``. The file is removed in a ``finally`` block.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

from shared.constants import PAGE_SIZE
from shared.shm import create_mapped, frames_view
from shared.timebound import TICK_SECONDS, bound_for
from vmm_agent.exposure import ExposureTable
from vmm_agent.guest import Content, GuestMemory
from vmm_agent.guest_os import GuestOS
from vmm_agent.page_check import BOUND_SHARE, DEFAULT_RATE, PageChecker

MiB = 1 << 20
_KEY = struct.Struct("<QQQ")


class _Clock:
    """Virtual time: each turn is a tick later, so rate and sweep budgets never bind."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Bench:
    """A guest with every page written and exposed on scattered frames."""

    def __init__(self, guest_bytes: int, batch: int, path: Path) -> None:
        self.pages = guest_bytes // PAGE_SIZE
        self.batch = batch
        self.file = create_mapped(path, 2 * self.pages * PAGE_SIZE)
        self.frames = frames_view(self.file)
        rng = np.random.default_rng(11)
        self.frame_of = rng.permutation(2 * self.pages)[: self.pages].astype(np.int64)
        self.guest = GuestMemory(0xBE7C, self.pages)
        kinds = rng.choice(3, self.pages, p=[0.1, 0.2, 0.7])
        picks = rng.integers(0, 1 << 30, self.pages)
        for bpn in range(self.pages):
            self.guest.write(
                self.frames, int(self.frame_of[bpn]), bpn, int(kinds[bpn]), int(picks[bpn])
            )
        self.exposure = ExposureTable(self.pages)
        bpns = np.arange(self.pages, dtype=np.int64)
        self.exposure.install(bpns, self.frame_of, np.ones(self.pages, dtype=bool))
        self.clock = _Clock()
        self.checker = PageChecker(
            self.frames,
            self.exposure,
            self.guest,
            GuestOS(self.pages),
            {},
            rate=1e9,
            clock=self.clock,
        )
        self.batches = [bpns[i : i + batch] for i in range(0, self.pages, batch)]
        self.reference = self.frames[self.frame_of]  # a copy: what memcmp compares with

    def close(self) -> None:
        del self.frames, self.checker, self.reference
        self.file.close()
        self.file.unlink()

    def sweep_checker(self) -> float:
        """Seconds for the checker to check every page once, in turns of ``batch``."""
        checker, clock = self.checker, self.clock
        checked = checker.checked
        t0 = time.perf_counter()
        while (done := checker.checked - checked) < self.pages:
            clock.now += TICK_SECONDS
            checker.run(min(self.batch, self.pages - done))
        seconds = time.perf_counter() - t0
        assert checker.mismatches == 0 and checker.checked - checked == self.pages
        return seconds

    def sweep_xxh3(self) -> float:
        frames, frame_of = self.frames, self.frame_of
        t0 = time.perf_counter()
        for bpns in self.batches:
            for f in frame_of[bpns].tolist():
                xxhash.xxh3_64_intdigest(frames[f])
        return time.perf_counter() - t0

    def sweep_memcmp(self) -> float:
        frames, frame_of, ref = self.frames, self.frame_of, self.reference
        t0 = time.perf_counter()
        for bpns in self.batches:
            same = (frames[frame_of[bpns]] == ref[bpns[0] : bpns[-1] + 1]).all(axis=1)
            assert same.all()
        return time.perf_counter() - t0

    def sweep_regenerate(self) -> float:
        t0 = time.perf_counter()
        for bpns in self.batches:
            assert not self._regenerated_mismatch(bpns).any()
        return time.perf_counter() - t0

    def _regenerated_mismatch(self, bpns: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """The rejected design: expected bytes rebuilt per kind, compared in NumPy."""
        g = self.guest
        words = self.frames.view(np.uint64)
        frames = self.frame_of[bpns]
        kind = g.kind[bpns]
        bad = np.zeros(len(bpns), dtype=bool)
        zero = kind == Content.ZERO
        bad[zero] = words[frames[zero]].any(axis=1)
        dup = kind == Content.DUPLICATE
        corpus = g.corpus.view(np.uint64)[g.corpus_index[bpns[dup]]]
        bad[dup] = (words[frames[dup]] != corpus).any(axis=1)
        uniq = kind == Content.UNIQUE
        keys = np.fromiter(
            (
                xxhash.xxh3_64_intdigest(_KEY.pack(g.vm_key, b, v))
                for b, v in zip(bpns[uniq].tolist(), g.version[bpns[uniq]].tolist(), strict=True)
            ),
            dtype=np.uint64,
            count=int(np.count_nonzero(uniq)),
        )
        got = words[frames[uniq]]
        got ^= g._base
        bad[uniq] = (got != keys[:, None]).any(axis=1)
        return bad


def run(guest_mib: int, batch: int, repeats: int) -> dict[str, Any]:
    bench = Bench(guest_mib * MiB, batch, Path("/dev/shm") / f"vmb-pagecheck-{os.getpid()}")
    try:
        kinds = {
            "checker": bench.sweep_checker,
            "xxh3": bench.sweep_xxh3,
            "memcmp": bench.sweep_memcmp,
            "regenerate": bench.sweep_regenerate,
        }
        for sweep in kinds.values():  # warm-up: page-table entries, first NumPy paths
            sweep()
        us: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(repeats):  # interleaved, so a busy moment hits every kind alike
            for name, sweep in kinds.items():
                us[name].append(sweep() / bench.pages * 1e6)
        med = {k: statistics.median(v) for k, v in us.items()}
        best = {k: min(v) for k, v in us.items()}  # the least disturbed sweep of each
        per_tick = DEFAULT_RATE * TICK_SECONDS * med["checker"] / 1e6
        # What a tick at the default rate costs against each bound; BOUND_SHARE caps it.
        ticks = {
            f"sensitivity_{s}": {
                "bound_seconds": bound_for(s),
                "pages": min(
                    DEFAULT_RATE * TICK_SECONDS,
                    int(BOUND_SHARE * bound_for(s) / (med["checker"] / 1e6)),
                ),
                "fraction_of_bound": round(
                    min(per_tick, BOUND_SHARE * bound_for(s)) / bound_for(s), 4
                ),
            }
            for s in (0, 4)
        }
        return {
            "guest_mib": guest_mib,
            "pages": bench.pages,
            "batch": batch,
            "repeats": repeats,
            "us_per_page": {k: round(v, 3) for k, v in med.items()},
            "us_per_page_min": {k: round(v, 3) for k, v in best.items()},
            "us_per_page_all": {k: [round(x, 3) for x in v] for k, v in us.items()},
            "checker_over_xxh3": round(med["checker"] / med["xxh3"], 3),
            "checker_over_xxh3_min": round(best["checker"] / best["xxh3"], 3),
            "checker_over_memcmp": round(med["checker"] / med["memcmp"], 3),
            "checker_over_memcmp_min": round(best["checker"] / best["memcmp"], 3),
            "regenerate_over_checker": round(med["regenerate"] / med["checker"], 3),
            "default_rate_pages_per_s": DEFAULT_RATE,
            "default_tick_seconds_uncapped": per_tick,
            "default_tick": ticks,
        }
    finally:
        bench.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=64, help="guest memory, MiB (default 64)")
    p.add_argument("--batch", type=int, default=100, help="pages per turn (default 100)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    result = run(args.mib, args.batch, args.repeats)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
