"""Working-set sampling, the platform's half: samples, periods and the estimate.

The sampling service sees a narrow context (here: a config, fresh metrics and a virtual
clock) and a VM whose control region is a bytearray; the monitor's report is written into
that region as the agent would (``write_sample_report``).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from platform_daemon.metrics import PlatformMetrics
from platform_daemon.p2m import P2M
from platform_daemon.services.sampling import (
    FAST_GAIN,
    SLOW_GAIN,
    SamplingService,
    WorkingSetEstimate,
)
from shared.config import PlatformConfig
from shared.constants import PageState, PageStatus
from shared.layout import ControlRegion, region_size

GUEST_PAGES = 20_000


@dataclass
class FakeVM:
    region: ControlRegion
    p2m: P2M
    vm_id: int = 1
    guest_pages: int = GUEST_PAGES


def make_vm(guest_pages: int = GUEST_PAGES, vm_id: int = 1) -> FakeVM:
    region = ControlRegion.initialize(
        bytearray(region_size(2, 512)),
        vm_id=vm_id,
        generation=1,
        slot_count=2,
        capacity=512,
        guest_pages=guest_pages,
    )
    return FakeVM(region, P2M(guest_pages), vm_id, guest_pages)


def make_service(pages: int = 100, period: float = 30.0) -> tuple[SamplingService, list[float]]:
    now = [0.0]
    config = PlatformConfig(sample_pages=pages, sample_period=period, sample_seed=7)
    ctx: Any = SimpleNamespace(
        config=config, metrics=PlatformMetrics(CollectorRegistry()), clock=lambda: now[0]
    )
    return SamplingService(ctx), now


def at(vm: FakeVM, progress: float) -> float:
    """The agent reports ``progress`` seconds of guest time; the daemon's clock reads the
    same (sampling periods run on guest time, the records on the daemon's clock)."""
    vm.region.guest_progress = progress
    return progress


def hand_out(svc: SamplingService, vm: FakeVM, now: float) -> np.ndarray:
    """Everything the current sample still has to hand out, as the engine would ask, with
    the guest's progress at ``now``."""
    at(vm, now)
    out = []
    while (n := svc.pending_work(vm, now)) > 0:  # type: ignore[arg-type]
        sel = svc.select_work(vm, 512, n, now)  # type: ignore[arg-type]
        out.append(sel.bpns)
        status = np.full(len(sel.bpns), PageStatus.OK, dtype=np.uint8)
        svc.complete(vm, sel.bpns, status)  # type: ignore[arg-type]
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


@pytest.mark.timeout(10)
def test_estimate_is_the_max_of_slow_fast_and_current() -> None:
    """ESX'02's smoothing: the first sample sets both averages; after that the fast one moves
    more; the estimate is the largest of slow, fast and fast-with-the-period-in-progress, so
    it rises at once and falls slowly."""
    est = WorkingSetEstimate()
    assert est.value() is None
    est.update(0.8)
    assert est.slow == est.fast == pytest.approx(0.8)
    est.update(0.2)
    assert est.fast == pytest.approx(0.8 + FAST_GAIN * (0.2 - 0.8))
    assert est.slow == pytest.approx(0.8 + SLOW_GAIN * (0.2 - 0.8))
    assert est.value() == pytest.approx(est.slow)  # falls slowly: the slow average leads
    # Touches in the period in progress lift it at once.
    assert est.value(partial=0.95) == pytest.approx(est.fast + FAST_GAIN * (0.95 - est.fast))
    assert est.value(partial=0.0) == pytest.approx(est.slow)


@pytest.mark.timeout(10)
def test_sample_is_handed_out_with_its_id_first() -> None:
    """A new VM gets a sample at once: ``sample_pages`` distinct pages in range, the region's
    sample id set before the first batch, then nothing more until the period ends."""
    svc, _ = make_service(pages=1000)
    vm = make_vm()
    assert svc.pending_work(vm, at(vm, 0.0)) == 1000  # type: ignore[arg-type]
    pages = hand_out(svc, vm, 0.0)
    assert len(pages) == 1000 == len(np.unique(pages))
    assert pages.min() >= 0 and pages.max() < GUEST_PAGES
    assert vm.region.sample_id == svc.vms[1].sample_id != 0
    assert svc.pending_work(vm, at(vm, 29.9)) == 0  # type: ignore[arg-type]


@pytest.mark.timeout(10)
def test_period_end_harvests_the_monitor_report() -> None:
    """At the end of a period the platform reads the monitor's (sample id, armed, touched),
    folds touched / armed into the estimate, records the period and draws the next sample."""
    svc, _ = make_service(pages=100, period=10.0)
    vm = make_vm()
    hand_out(svc, vm, 0.0)
    first = vm.region.sample_id
    vm.region.write_sample_report(first, 100, 40)  # the agent's words
    assert svc.estimate_fraction(vm) == pytest.approx(0.4)  # type: ignore[arg-type]
    assert svc.pending_work(vm, at(vm, 10.0)) == 100  # type: ignore[arg-type]
    hand_out(svc, vm, 10.0)
    assert vm.region.sample_id != first
    (record,) = svc.history(vm)  # type: ignore[arg-type]
    assert record["sample_id"] == first and record["touched"] == 40
    assert record["started"] == 0.0 and record["ended"] == 10.0
    assert record["estimate"] == pytest.approx(0.4)
    assert svc.status(vm)["estimate_pages"] == round(0.4 * GUEST_PAGES)  # type: ignore[arg-type]


@pytest.mark.timeout(10)
def test_the_fraction_is_over_the_pages_the_monitor_armed() -> None:
    """When the monitor armed only part of the sample before the period ended (its rounds did
    not get through it), the fraction is touched over armed, not over the sample's size."""
    svc, _ = make_service(pages=200, period=10.0)
    vm = make_vm()
    hand_out(svc, vm, 0.0)
    vm.region.write_sample_report(vm.region.sample_id, 50, 25)
    svc.pending_work(vm, at(vm, 10.0))  # type: ignore[arg-type]
    assert svc.history(vm)[-1]["estimate"] == pytest.approx(0.5)  # type: ignore[arg-type]


@pytest.mark.timeout(10)
def test_every_prefix_of_the_sample_is_uniform_over_the_guest() -> None:
    """The monitor arms a sample in the order it is handed out, and a period may end before
    it armed all of it: the fraction is then over the pages armed so far, which must be a
    uniform sample themselves. Handed out sorted, the first batch would be the low guest
    addresses only, where working sets often start (a guest using the lower half would
    read as 100 % of it touched)."""
    svc, _ = make_service(pages=4000, period=10.0)
    vm = make_vm()
    for period in range(3):  # the first batch of three samples
        now = at(vm, 10.0 * period)
        assert svc.pending_work(vm, now) == 4000  # type: ignore[arg-type]
        first = svc.select_work(vm, 256, 256, now).bpns  # type: ignore[arg-type]
        assert len(first) == 256
        lower = np.count_nonzero(first < GUEST_PAGES // 2) / len(first)
        assert 0.35 <= lower <= 0.65, lower  # binomial(256, 0.5): 0.5 +- 0.03


@pytest.mark.timeout(10)
def test_the_sample_id_is_set_before_the_first_batch_of_a_sample() -> None:
    """The region's sample id names the new sample as soon as its first batch is handed out
    (the monitor reads it with that batch), not once the whole sample is out."""
    svc, _ = make_service(pages=1000, period=10.0)
    vm = make_vm()
    svc.pending_work(vm, at(vm, 0.0))  # type: ignore[arg-type]
    svc.select_work(vm, 512, 512, 0.0)  # type: ignore[arg-type]
    assert vm.region.sample_id == svc.vms[1].sample_id != 0
    first = vm.region.sample_id
    svc.select_work(vm, 512, 512, 0.0)  # type: ignore[arg-type]
    svc.pending_work(vm, at(vm, 10.0))  # type: ignore[arg-type]
    assert vm.region.sample_id == first  # the next id appears with the next sample's batch
    svc.select_work(vm, 512, 512, 10.0)  # type: ignore[arg-type]
    assert vm.region.sample_id == svc.vms[1].sample_id != first


@pytest.mark.timeout(10)
def test_a_period_the_monitor_never_armed_is_missed_not_zero() -> None:
    """When the report is about another sample (the monitor never got this one: its rounds
    did not run), the period is counted as missed and leaves the estimate alone."""
    svc, _ = make_service(pages=100, period=10.0)
    vm = make_vm()
    hand_out(svc, vm, 0.0)
    vm.region.write_sample_report(vm.region.sample_id, 100, 50)
    svc.pending_work(vm, at(vm, 10.0))  # type: ignore[arg-type]
    before = svc.vms[1].estimate.samples
    svc.pending_work(vm, at(vm, 20.0))  # type: ignore[arg-type]  # nothing handed out, nothing armed
    assert svc.vms[1].estimate.samples == before
    assert svc.history(vm)[-1]["estimate"] is None  # type: ignore[arg-type]
    registry = svc.ctx.metrics.registry
    assert registry.get_sample_value("vmmem_sampling_periods_total", {"outcome": "missed"}) == 1


@pytest.mark.timeout(10)
def test_a_shorter_period_takes_effect_for_the_current_sample() -> None:
    """``configure(period=...)`` ends the current period by the new length, not the old one."""
    svc, _ = make_service(pages=10, period=30.0)
    vm = make_vm()
    hand_out(svc, vm, 0.0)
    svc.configure(period=1.0)
    assert svc.pending_work(vm, at(vm, 1.0)) == 10  # type: ignore[arg-type]


@pytest.mark.timeout(10)
def test_periods_run_on_guest_time() -> None:
    """A sampling period ends after ``period`` seconds of the guest's progress (what the
    agent reports), however long that takes on the daemon's clock: a stalled guest's sample
    stays out until it has had its time."""
    svc, _ = make_service(pages=10, period=1.0)
    vm = make_vm()
    hand_out(svc, vm, 0.0)
    first = vm.region.sample_id
    vm.region.guest_progress = 0.5
    assert svc.pending_work(vm, 100.0) == 0  # type: ignore[arg-type]  # 100 s, 0.5 s of guest
    vm.region.guest_progress = 1.0
    assert svc.pending_work(vm, 101.0) == 10  # type: ignore[arg-type]
    (record,) = svc.history(vm)  # type: ignore[arg-type]
    assert record["sample_id"] == first and record["ended"] == 101.0


@pytest.mark.timeout(10)
def test_samples_are_uniform_over_all_pages_whatever_their_state() -> None:
    """Unbiased: the sample is drawn over every guest page, swapped, untouched or exposed
    alike, so pages reclaimed from the guest stay in the estimate's denominator."""
    svc, _ = make_service(pages=200, period=1.0)
    vm = make_vm(guest_pages=1000)
    vm.p2m.state[:300] = PageState.SWAPPED
    vm.p2m.state[300:600] = PageState.ZERO
    vm.p2m.state[600:] = PageState.EXPOSED
    counts = np.zeros(1000)
    for i in range(100):
        counts[hand_out(svc, vm, float(i))] += 1
    # 100 samples of 200 out of 1000: each page expected 20 times.
    shares = [counts[:300].sum(), counts[300:600].sum(), counts[600:].sum()]
    assert shares == pytest.approx([6000, 6000, 8000], rel=0.05)
    assert counts.min() > 0
