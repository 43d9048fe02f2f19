"""Working-set sampling, the monitor's half: arm the sample, watch it, count first touches.

The platform draws each period's sample (uniform over all guest pages) and hands it over
in SAMPLING batches. The monitor answers at once: every page is accepted (OK) except pages
pinned for I/O, which are in use right now and count as touched (BUSY). Arming is
monitor-side work, queued here and done by the monitor queue within the low-priority time
bound: every armed page is *watched*, and a mapped one is also *hidden*, so its next guest
touch traps in the monitor, which maps it back without a message to the platform. The first
touch of a watched page, wherever it is (hidden, swapped, never touched, shared), passes
through the fault path and is counted once. The counts reach the platform through the
control region (``write_sample_report``).

A new sample ends the old one: its pages stop being watched and get their mappings back.
Its truth is the pages the guest touched from the first batch of the old sample to the first
batch of the new one. That window is kept beside it (CLOCK_MONOTONIC, as the platform's
periods): the platform ends a period when it draws the next sample, but that sample reaches
the monitor only with a low-priority round, which may come a while later (under memory
pressure, at the start of a new workload phase). A report compares a period's estimate with
its truth only where both windows lie in the same phase.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from shared.constants import PageStatus
from shared.layout import ControlRegion

from .exposure import ExposureTable
from .touches import TouchLog

_EMPTY = np.empty(0, dtype=np.int64)
#: Finished periods whose truth is kept for the load generator's report.
TRUTH_KEPT = 512


class Sampler:
    """The monitor's state for the current working-set sample."""

    name = "sampling"

    def __init__(
        self,
        exposure: ExposureTable,
        region: ControlRegion,
        touches: TouchLog,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.exposure = exposure
        self.region = region
        self.touches = touches
        self.clock = clock
        self.sample_id = 0
        self.armed = 0
        self.touched = 0
        self.pages = _EMPTY  # every page of the current sample received so far
        self._queue = _EMPTY  # received, not armed yet
        #: sample id -> fraction of guest pages the guest touched while it was current.
        self.truth: OrderedDict[int, float] = OrderedDict()
        #: sample id -> (start, end) of the window its truth was counted in.
        self.truth_windows: OrderedDict[int, tuple[float, float]] = OrderedDict()
        self._window_start = 0.0

    # ---- batches from the platform --------------------------------------------------------

    def receive(self, bpns: npt.NDArray[np.int64], status: npt.NDArray[np.uint8]) -> None:
        """A SAMPLING batch: write its statuses and queue its pages for arming."""
        sample_id = self.region.sample_id
        if sample_id != self.sample_id:
            self._new_sample(sample_id)
        pinned = self.exposure.pinned[bpns] > 0
        status[:] = PageStatus.OK
        status[pinned] = PageStatus.BUSY
        busy = int(np.count_nonzero(pinned))
        self.armed += busy
        self.touched += busy
        self.pages = np.concatenate((self.pages, bpns))
        self._queue = np.concatenate((self._queue, bpns[~pinned]))
        self._report()

    def _new_sample(self, sample_id: int) -> None:
        """End the current sample (its truth is recorded) and start watching a new one."""
        finished = self.touches.advance()
        now = self.clock()
        if self.sample_id:
            self.truth[self.sample_id] = finished / self.exposure.guest_pages
            self.truth_windows[self.sample_id] = (self._window_start, now)
            while len(self.truth) > TRUTH_KEPT:
                self.truth.popitem(last=False)
                self.truth_windows.popitem(last=False)
        self._window_start = now
        old = self.pages
        self.exposure.watched[old] = False
        self.exposure.unhide_all(old)
        self.sample_id = sample_id
        self.armed = self.touched = 0
        self.pages = self._queue = _EMPTY

    # ---- monitor-side work ----------------------------------------------------------------

    def has_work(self) -> bool:
        return len(self._queue) > 0

    def run(self, units: int) -> int:
        """Arm up to ``units`` queued pages; returns how many were armed.

        A page pinned since its batch arrived is in use: counted as touched, not hidden (a
        pinned page must stay mapped).
        """
        take, self._queue = self._queue[:units], self._queue[units:]
        if len(take) == 0:
            return 0
        pinned = self.exposure.pinned[take] > 0
        arm = take[~pinned]
        self.exposure.watched[arm] = True
        self.exposure.hide(arm)
        self.armed += len(take)
        self.touched += int(np.count_nonzero(pinned))
        self._report()
        return len(take)

    # ---- the fault path -------------------------------------------------------------------

    def touch(self, bpn: int) -> None:
        """The guest touched watched page ``bpn``: count it once."""
        self.exposure.watched[bpn] = False
        self.touched += 1
        self._report()

    def _report(self) -> None:
        self.region.write_sample_report(self.sample_id, self.armed, self.touched)

    def status(self) -> dict[str, object]:
        return {
            "sample_id": self.sample_id,
            "armed": self.armed,
            "touched": self.touched,
            "queued": len(self._queue),
        }
