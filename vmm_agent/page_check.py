"""Page checking: the monitor re-verifies a rolling sample of the pages it maps.

Every guest read is checked against the guest model (``guest.py``), but a page the guest
does not read could hold anything. So at low priority, inside the round's time bound, the
monitor walks guest memory with a cursor (a clock hand, like the swap selection's) and
checks the pages it maps against the model: each frame is hashed with xxh3, as a guest read
hashes it, and the batch's hashes are compared with the model's expected hashes in one NumPy
operation. A page the guest never wrote is expected to be zero, as the model says. Every
mapped page is checked once per sweep of the cursor, so corruption of any page is found
within ``guest_pages / rate`` seconds of guest progress.

It is a task of the monitor-side queue (``monitor.py``), after sampling's arming. Its rate
(pages per second) is a token bucket that holds at most one tick's worth, so a round checks
at most ``rate * TICK_SECONDS`` pages, and never more than the monitor's share of the bound
(the queue sizes each turn from the measured cost per page). Nor does it take more than
``BOUND_SHARE`` (10 %) of each tick's bound, however high the rate: a latency-sensitive VM's
small bound stays the platform's and sampling's. The cursor passes over guest memory at
most once a tick: no page is checked twice in one round.

What is skipped, and why:

- pages the monitor does not map (not exposed, in flight, swapped, never touched): there is
  no frame of the guest's to read;
- pages with a fault on the wire: the reply may remap them, and a write fault has already
  dropped the old mapping (copy-on-write);
- pages in the balloon: the guest gave them away and expects nothing of them.

A page hidden by working-set sampling is checked through the monitor's hidden mapping and
stays hidden and watched: the check is the monitor's read, not a guest touch. Nothing here
counts as a guest access: no accessed bit (the swap filter's second chance), no touch stamp,
no sampling touch, no fault, no refault.

A mismatch is data loss: counted, remembered (the first few), and logged once per batch with
the count and the first BPNs, never once per page. A page that stays corrupt is found again,
and counted again, at each sweep.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
import xxhash

from shared.timebound import TICK_SECONDS

from .exposure import ExposureTable
from .guest import GuestMemory
from .guest_os import BALLOON, GuestOS

log = structlog.get_logger("vmmem.vmm.page_check")
#: Default rate, pages per second: 100 pages a tick, about 0.15 ms of an 8 ms bound here
#: (docs/performance.md, "Page checking"); a 64 MiB guest is swept in 16 s.
DEFAULT_RATE = 1000.0
#: The most of each tick's time bound page checking takes, whatever its rate: at the default
#: rate this binds only on latency-sensitive VMs (a bound of 0.5 ms pays for ~30 pages).
BOUND_SHARE = 0.1
#: Seconds per page checked before the first turn measured it, and the moving average's gain.
INITIAL_COST = 2e-6
COST_GAIN = 0.25
#: How long the checker rests after a sweep found nothing to check.
EMPTY_REST_SECONDS = 1.0
#: BPNs looked at per window of the cursor (slices of the exposure table: cheap), at least
#: and at most, and the most one turn looks at before it gives up for now (a mostly
#: unmapped, huge guest).
MIN_WINDOW = 128
WINDOW = 8192
MAX_SCAN = 1 << 16
#: BPNs named in one mismatch log event, and mismatches remembered for the results.
LOGGED_BPNS = 8
MISMATCHES_KEPT = 100
#: Float dust of the buckets' arithmetic: 0.1 s at 1000 pages/s is 100 pages, not 99.
_DUST = 1e-6


class PageChecker:
    """The monitor task that checks mapped pages against the guest model, at a set rate."""

    name = "page_check"
    #: Always has work: the low-priority loop runs a round for it alone only on spare credit.
    background = True

    def __init__(
        self,
        frames: npt.NDArray[np.uint8],
        exposure: ExposureTable,
        guest: GuestMemory,
        guest_os: GuestOS,
        faulting: Collection[int],
        rate: float = DEFAULT_RATE,
        clock: Callable[[], float] = time.monotonic,
        bound: Callable[[], float] | None = None,
    ) -> None:
        self.frames = frames
        self.exposure = exposure
        self.guest = guest
        self.os = guest_os
        #: BPNs with a fault on the wire (the fault path's table).
        self.faulting = faulting
        self.clock = clock
        self.guest_pages = exposure.guest_pages
        self.cursor = 0
        self.rate = 0.0
        self.tokens = 0.0
        #: BPNs the cursor may still pass over: one sweep a tick at most, so a small guest
        #: at a high rate is not checked twice over in one round.
        self.scan_left = float(self.guest_pages)
        #: The VM's time bound now (the low-priority loop's), and the seconds of checking
        #: left of this tick's share of it (BOUND_SHARE), with the measured cost per page.
        self.bound: Callable[[], float] | None = None  # set below: it may not answer yet
        self.time_left = 0.0
        self.per_page = INITIAL_COST
        self._last = clock()
        #: No page was checkable in the last full sweep: nothing to do until then.
        self._rest_until = -math.inf
        self._unmapped_run = 0  # BPNs looked at since the last checkable one
        self.set_rate(rate)
        self.bound = bound
        self.checked = 0
        self.mismatches = 0
        self.sweeps = 0  # times the cursor came round
        self.skipped_faulting = 0
        self.skipped_ballooned = 0
        self.checked_hidden = 0
        self.mismatch_log: list[dict[str, int]] = []

    # ---- the rate -------------------------------------------------------------------------

    @property
    def burst(self) -> float:
        """The most the bucket holds: one tick's worth of the rate."""
        return self.rate * TICK_SECONDS

    def set_rate(self, rate: float) -> None:
        """Pages per second (0: off). Raises ValueError on a negative or non-finite rate."""
        if not math.isfinite(rate) or rate < 0:
            raise ValueError(f"page check rate must be a finite number >= 0, got {rate}")
        self._refill()
        self.rate = float(rate)
        self.tokens = min(self.tokens, self.burst)

    def _refill(self) -> None:
        now = self.clock()
        elapsed = max(0.0, now - self._last)
        self.tokens = min(self.burst, self.tokens + self.rate * elapsed)
        sweep = self.guest_pages
        self.scan_left = min(sweep, self.scan_left + sweep * elapsed / TICK_SECONDS)
        if self.bound is not None:
            share = BOUND_SHARE * self.bound()
            self.time_left = min(share, self.time_left + share * elapsed / TICK_SECONDS)
        self._last = now

    def _time_allows(self) -> int:
        """Pages this tick's share of the bound still pays for, at the measured cost; at
        least one when the whole share is there, so that an estimate blown up by a turn the
        OS preempted is measured again instead of stopping checking for good."""
        if self.bound is None:
            return 1 << 62
        share = BOUND_SHARE * self.bound()
        pages = int(self.time_left / max(self.per_page, 1e-9) + _DUST)
        return max(pages, 1) if self.time_left >= share * (1 - 1e-9) else pages

    # ---- the monitor task -----------------------------------------------------------------

    def has_work(self) -> bool:
        self._refill()
        return (
            self.tokens + _DUST >= 1
            and self.scan_left + _DUST >= 1
            and self._time_allows() >= 1
            and self.clock() >= self._rest_until
        )

    def run(self, units: int) -> int:
        """Check up to ``units`` pages (and what the rate and the share of the bound
        allow); returns how many."""
        self._refill()
        wanted = min(units, int(self.tokens + _DUST), self._time_allows())
        if wanted < 1:
            return 0
        t0 = self.clock()
        bpns = self._next_pages(wanted)
        if len(bpns):
            self.tokens = max(0.0, self.tokens - len(bpns))
            self._check(bpns)
        spent = self.clock() - t0
        if self.bound is not None:  # a turn that took longer than foreseen is paid back
            self.time_left = max(-BOUND_SHARE * self.bound(), self.time_left - spent)
        if len(bpns):
            self.per_page += COST_GAIN * (spent / len(bpns) - self.per_page)
        return len(bpns)

    def _next_pages(self, wanted: int) -> npt.NDArray[np.int64]:
        """Up to ``wanted`` checkable BPNs from the cursor on, advancing it past them."""
        found: list[npt.NDArray[np.int64]] = []
        count = scanned = 0
        limit = min(MAX_SCAN, int(self.scan_left + _DUST))
        window = MIN_WINDOW
        while count < wanted and scanned < limit:
            # Twice what is still wanted (most pages are mapped in a busy guest), more each
            # time a window falls short (a sparse one).
            window = min(WINDOW, max(window * 2, 2 * (wanted - count)))
            start = self.cursor
            end = min(self.guest_pages, start + window, start + limit - scanned)
            checkable, ballooned, faulting = self._checkable(start, end)
            ok = np.flatnonzero(checkable)[: wanted - count]
            if len(ok) == wanted - count:  # the cursor stops right after the last page taken
                end = start + int(ok[-1]) + 1
            # Skips are counted over what the cursor passed only: the window may reach
            # further, and those pages are looked at again by the next turn.
            self.skipped_ballooned += int(np.count_nonzero(ballooned[: end - start]))
            self.skipped_faulting += int(np.count_nonzero(faulting[: end - start]))
            found.append(ok + start)
            count += len(ok)
            scanned += end - start
            self.cursor = end % self.guest_pages
            if self.cursor == 0:
                self.sweeps += 1
        self.scan_left = max(0.0, self.scan_left - scanned)
        # A whole sweep (over as many turns as it takes) without one checkable page: rest a
        # while instead of a round every tick that scans an empty table (a VM that has not
        # run yet would otherwise never have an idle tick).
        self._unmapped_run = 0 if count else self._unmapped_run + scanned
        if self._unmapped_run >= self.guest_pages:
            self._unmapped_run = 0
            self._rest_until = self.clock() + EMPTY_REST_SECONDS
        return np.concatenate(found) if found else np.empty(0, dtype=np.int64)

    def _checkable(
        self, start: int, end: int
    ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
        """Which BPNs of ``start:end`` may be checked now, and which mapped ones are skipped
        as ballooned or as faulting (module docstring: the skips)."""
        exposure = self.exposure
        mapped = exposure.mapped_in(start, end)
        ballooned = mapped & (self.os.kind[start:end] == BALLOON)
        ok: npt.NDArray[np.bool_] = mapped & ~ballooned
        faulting = np.zeros(end - start, dtype=bool)
        if self.faulting:  # a few dozen at most (the outstanding-fault bound)
            busy = np.fromiter(self.faulting, dtype=np.int64, count=len(self.faulting))
            busy = busy[(busy >= start) & (busy < end)] - start
            faulting[busy] = ok[busy]
            ok[busy] = False
        return ok, ballooned, faulting

    def _check(self, bpns: npt.NDArray[np.int64]) -> None:
        """Hash each page's frame (the part that is per page) and compare the batch at once."""
        frames = self.frames
        mapped = self.exposure.mapped_frame(bpns)
        hashes = np.fromiter(
            (xxhash.xxh3_64_intdigest(frames[f]) for f in mapped.tolist()),
            dtype=np.uint64,
            count=len(mapped),
        )
        bad = np.flatnonzero(hashes != self.guest.expected[bpns])
        self.checked += len(bpns)
        self.checked_hidden += int(np.count_nonzero(self.exposure.frame[bpns] < 0))
        if len(bad):
            self._mismatch(bpns[bad], mapped[bad], len(bpns))

    def _mismatch(
        self, bpns: npt.NDArray[np.int64], frames: npt.NDArray[np.int64], batch: int
    ) -> None:
        self.mismatches += len(bpns)
        versions = self.guest.version[bpns]
        keep = max(0, MISMATCHES_KEPT - len(self.mismatch_log))
        for bpn, frame, version in zip(
            bpns[:keep].tolist(), frames[:keep].tolist(), versions[:keep].tolist(), strict=True
        ):
            self.mismatch_log.append({"bpn": bpn, "frame": frame, "version": version})
        log.error(
            "page_check_mismatch",
            count=len(bpns),
            checked=batch,
            bpns=bpns[:LOGGED_BPNS].tolist(),
            frames=frames[:LOGGED_BPNS].tolist(),
            mismatches=self.mismatches,
        )

    def summary(self) -> dict[str, Any]:
        """Counts and settings for the agent's progress and results."""
        return {
            "rate": self.rate,
            "checked": self.checked,
            "mismatches": self.mismatches,
            "sweeps": self.sweeps,
            "checked_hidden": self.checked_hidden,
            "skipped_faulting": self.skipped_faulting,
            "skipped_ballooned": self.skipped_ballooned,
            "mismatch_log": self.mismatch_log[:10],
        }
