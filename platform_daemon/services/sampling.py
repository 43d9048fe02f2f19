"""Working-set sampling (Waldspurger, OSDI 2002, §5.3): the platform's half.

Each sampling period the platform draws ``n`` pages of the VM uniformly at random (100 every
30 s by default, both settable) and hands them to the monitor in SAMPLING batches, the
first class of the low-priority order. As in ESX, the period is measured in the VM's own
time: the guest progress the agent reports in the control region, which stops while the
guest is stalled on the platform, so a stalled guest's samples do not go by unmeasured.
The monitor does the rest on its side: it invalidates the sampled pages in its own tables
(its monitor-side queue), counts the first guest touch of each on its fault path, and
reports (pages watched, pages touched) in the control region. At the end of the period the
platform reads the report: ``f = t / a``, the pages touched over the pages armed (``a`` is
``n`` unless the monitor's rounds did not get through the whole sample in time).

The estimate is the paper's: the maximum of a slow and a fast exponentially-weighted moving
average of ``f`` and of a version of the fast one that already includes the touches of the
period in progress, so it rises at once when the guest's working set grows and falls slowly
when it shrinks.

Unbiased by reclaim: the sample is drawn over *all* guest pages, whatever their state, and
the monitor watches every sampled page, mapped or not. A page that is swapped, ballooned,
shared (mapped read-only) or never touched is watched like any other: its next touch traps
in the monitor anyway (a fault to the platform, or the monitor's own invalidation for a
mapped page, a shared one included), and is counted. So ``f`` is the fraction of the whole
guest touched in the period, and reclaiming idle pages cannot shrink it; ballooned pages
count as untouched because the guest does not touch them. A page pinned for I/O when it is
armed counts as touched (it is in use), rather than being left out of the sample.

Sampling never takes a page from the VMM (``takes_pages = False``): the platform's p2m is
untouched, and faults on sampled pages are ordinary faults.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import structlog

from shared.constants import NO_FRAME, ServiceType

from .base import LowPriorityService, Pages, Selection

if TYPE_CHECKING:
    from ..context import ServiceContext
    from ..vm import VM

log = structlog.get_logger("vmmem.platform.sampling")
#: Gains of the moving averages (fraction of a new sample taken in).
SLOW_GAIN = 0.4
FAST_GAIN = 0.75
#: Periods remembered per VM for reports (estimate against truth).
HISTORY = 512


@dataclass
class WorkingSetEstimate:
    """ESX'02's smoothed estimate of the fraction of memory the guest actively uses."""

    slow: float | None = None
    fast: float | None = None
    samples: int = 0

    def update(self, f: float) -> None:
        """Fold in the fraction touched in a finished period."""
        if self.slow is None or self.fast is None:
            self.slow = self.fast = f  # the first sample is the best guess of both
        else:
            self.slow += SLOW_GAIN * (f - self.slow)
            self.fast += FAST_GAIN * (f - self.fast)
        self.samples += 1

    def value(self, partial: float | None = None) -> float | None:
        """max(slow, fast, fast with the period in progress); None before any sample."""
        if self.slow is None or self.fast is None:
            return partial
        current = self.fast if partial is None else self.fast + FAST_GAIN * (partial - self.fast)
        return max(self.slow, self.fast, current)


@dataclass
class PeriodRecord:
    """One finished sampling period of one VM (``started``, ``ended``: the daemon's clock)."""

    sample_id: int
    started: float
    ended: float
    armed: int
    touched: int
    estimate: float | None


@dataclass
class _VMSampling:
    sample_id: int = 0
    pages: Pages = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    handed: int = 0
    started: float = 0.0  # the daemon's clock
    progress_start: float = 0.0  # the VM's guest progress (seconds)
    period_end: float = -1.0  # in guest progress
    estimate: WorkingSetEstimate = field(default_factory=WorkingSetEstimate)
    history: deque[PeriodRecord] = field(default_factory=lambda: deque(maxlen=HISTORY))


class SamplingService(LowPriorityService):
    """Draws each VM's samples and turns the monitor's counts into an estimate."""

    service = ServiceType.SAMPLING
    takes_pages = False

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.period = ctx.config.sample_period
        self.sample_pages = ctx.config.sample_pages
        self.rng = np.random.default_rng(ctx.config.sample_seed)
        self.vms: dict[int, _VMSampling] = {}
        self._next_id = 1

    def configure(self, period: float | None = None, pages: int | None = None) -> None:
        """Change the period (the current periods end by the new one) or the sample size
        (from each VM's next sample)."""
        if period is not None:
            self.period = period
            for st in self.vms.values():
                st.period_end = min(st.period_end, st.progress_start + period)
        if pages is not None:
            self.sample_pages = pages

    def _state(self, vm: VM) -> _VMSampling:
        st = self.vms.get(vm.vm_id)
        if st is None:
            st = self.vms[vm.vm_id] = _VMSampling()
        return st

    def pending_work(self, vm: VM, now: float) -> int:
        st = self._state(vm)
        progress = vm.region.guest_progress
        if progress >= st.period_end:
            self._new_period(vm, st, now, progress)
        return len(st.pages) - st.handed

    def _new_period(self, vm: VM, st: _VMSampling, now: float, progress: float) -> None:
        """Harvest the finished sample (if the monitor got it) and draw the next one."""
        if st.sample_id:
            report_id, armed, touched = vm.region.read_sample_report()
            estimate = None
            if report_id == st.sample_id and armed > 0:
                st.estimate.update(min(1.0, touched / armed))
                estimate = st.estimate.value()
                self.ctx.metrics.sampling_periods.labels("measured").inc()
            else:  # the monitor never armed it (no low-priority round ran): no data
                armed = touched = 0
                self.ctx.metrics.sampling_periods.labels("missed").inc()
            st.history.append(PeriodRecord(st.sample_id, st.started, now, armed, touched, estimate))
        n = min(self.sample_pages, vm.guest_pages)
        # In the draw's random order, not sorted: the monitor arms the sample in the order it
        # is handed out, and a period may end before it armed all of it. Any prefix of a
        # random permutation is itself a uniform sample; a sorted prefix is the low guest
        # addresses only, where working sets often start (CI saw 0.85 for a truth of 0.48).
        st.pages = self.rng.choice(vm.guest_pages, n, replace=False).astype(np.int64)
        st.handed = 0
        st.sample_id = self._next_id
        self._next_id += 1
        st.started, st.progress_start = now, progress
        st.period_end = progress + self.period

    def select_work(self, vm: VM, capacity: int, units: int, now: float) -> Selection:
        st = self._state(vm)
        take = min(capacity, units, len(st.pages) - st.handed)
        if take <= 0:
            return Selection.empty()
        if st.handed == 0:
            vm.region.sample_id = st.sample_id  # before the first batch of this sample
        bpns = st.pages[st.handed : st.handed + take]
        st.handed += take
        return Selection(bpns, np.full(take, NO_FRAME, dtype=np.int64), take)

    def complete(self, vm: VM, accepted: Pages, status: npt.NDArray[np.uint8]) -> None:
        # The monitor armed the pages (OK) or counted them touched at once (BUSY: pinned);
        # its report in the control region carries the counts. Nothing changes here.
        self.ctx.metrics.sampled_pages.inc(len(accepted))

    def estimate_fraction(self, vm: VM) -> float | None:
        """The current estimate, touches of the period in progress included."""
        st = self.vms.get(vm.vm_id)
        if st is None:
            return None
        report_id, armed, touched = vm.region.read_sample_report()
        partial = touched / armed if report_id == st.sample_id and armed > 0 else None
        return st.estimate.value(partial)

    def status(self, vm: VM) -> dict[str, object]:
        """What ``vmmem-ctl status`` and the load generator show of this VM's sampling."""
        st = self._state(vm)
        fraction = self.estimate_fraction(vm)
        return {
            "sample_id": st.sample_id,
            "period_seconds": self.period,
            "sample_pages": len(st.pages),
            "estimate_fraction": fraction,
            "estimate_pages": None if fraction is None else round(fraction * vm.guest_pages),
            "slow": st.estimate.slow,
            "fast": st.estimate.fast,
            "periods_measured": sum(1 for r in st.history if r.estimate is not None),
        }

    def history(self, vm: VM) -> list[dict[str, object]]:
        """The VM's finished periods, oldest first (for the load generator's report)."""
        st = self.vms.get(vm.vm_id)
        return [] if st is None else [vars(r).copy() for r in st.history]

    def on_vm_gone(self, vm: VM) -> None:
        self.vms.pop(vm.vm_id, None)
