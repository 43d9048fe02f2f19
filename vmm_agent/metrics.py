"""Prometheus metrics of one VMM agent (label ``vm``: one value per process, bounded)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from shared.plain_histogram import PlainHistogram

if TYPE_CHECKING:
    from .agent import Agent
    from .lowprio import RoundRecord

LATENCY_BUCKETS = (
    2.5e-5,
    5e-5,
    7.5e-5,
    1e-4,
    1.5e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    1e-2,
    2.5e-2,
    0.1,
    0.5,
    1.0,
    5.0,
)


#: Low-priority round times: from a fraction of a 0.5 ms bound to well past an 8 ms one.
ROUND_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 0.1, 0.5)
#: Overrun as a fraction of the bound.
OVERRUN_BUCKETS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class AgentMetrics:
    """Metrics updated on the agent's paths."""

    def __init__(self, registry: CollectorRegistry, vm: str) -> None:
        self.registry = registry
        self.vm = vm
        self.fault_seconds = FaultLatency(vm, LATENCY_BUCKETS)
        registry.register(self.fault_seconds)
        self.batch_seconds = Histogram(
            "vmmem_vmm_batch_seconds",
            "VMM time to filter and invalidate one batch",
            ["vm", "service"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.platform_resumes = Counter(
            "vmmem_vmm_platform_resumes",
            "Times this VM carried on with a platform daemon that took over after a crash",
            registry=registry,
        )
        self.platform_downtime = Counter(
            "vmmem_vmm_platform_downtime_seconds",
            "Time this VM's guest was stalled waiting for a platform daemon to take over",
            registry=registry,
        )
        self.batch_pages = Counter(
            "vmmem_vmm_batch_pages",
            "Pages the VMM accepted or refused, by reason",
            ["vm", "service", "status"],
            registry=registry,
        )

        self.lowprio_rounds = Counter(
            "vmmem_vmm_lowprio_rounds",
            "Low-priority rounds by outcome (done, bound, preempted)",
            ["vm", "outcome"],
            registry=registry,
        )
        self.lowprio_used = Histogram(
            "vmmem_vmm_lowprio_round_seconds",
            "Time one low-priority round kept the guest exited",
            ["vm"],
            buckets=ROUND_BUCKETS,
            registry=registry,
        )
        self.lowprio_overrun = Histogram(
            "vmmem_vmm_lowprio_overrun_ratio",
            "Time a low-priority round ran past its bound, as a fraction of the bound",
            ["vm"],
            buckets=OVERRUN_BUCKETS,
            registry=registry,
        )
        self.lowprio_gap = Histogram(
            "vmmem_vmm_lowprio_progress_gap_seconds",
            "At a round's start, time since the guest last made progress",
            ["vm"],
            buckets=ROUND_BUCKETS,
            registry=registry,
        )
        self.lowprio_time = Counter(
            "vmmem_vmm_lowprio_time_seconds",
            "Time spent in low-priority rounds (its rate is the share of the guest's time)",
            ["vm"],
            registry=registry,
        )
        self.lowprio_bound = Gauge(
            "vmmem_vmm_lowprio_bound_seconds",
            "The last tick's bound: latency sensitivity's budget times guest progress",
            ["vm"],
            registry=registry,
        )
        self.lowprio_last_start = Gauge(
            "vmmem_vmm_lowprio_last_round_start_timestamp_seconds",
            "When the last low-priority round started (Unix time)",
            ["vm"],
            registry=registry,
        )

    def observe_low_round(self, record: RoundRecord) -> None:
        vm = self.vm
        self.lowprio_rounds.labels(vm, record.outcome).inc()
        self.lowprio_used.labels(vm).observe(record.used)
        self.lowprio_overrun.labels(vm).observe(record.overrun / record.bound)
        self.lowprio_gap.labels(vm).observe(record.gap)
        self.lowprio_time.labels(vm).inc(record.used)
        self.lowprio_bound.labels(vm).set(record.bound)
        self.lowprio_last_start.labels(vm).set(time.time() - (time.monotonic() - record.started))

    def observe_fault(self, reason: str, seconds: float) -> None:
        self.fault_seconds.observe(reason, seconds)


class FaultLatency(Collector):
    """``vmmem_guest_fault_latency_seconds{vm, reason}``, kept as plain numbers and exported
    at scrape time, as the daemon's fault metrics are (``shared/plain_histogram.py``).

    Why: it is observed on every fault, and a prometheus_client Histogram child's
    ``observe`` took ~10x the time of this one (3.5 against 0.36 µs, measured on a loaded
    machine). A reason appears once it has a fault, as the Histogram's lazily bound
    children did.
    """

    NAME = "vmmem_guest_fault_latency_seconds"
    DOC = "Guest-visible fault latency: fault sent to mapping installed"

    def __init__(self, vm: str, buckets: Sequence[float]) -> None:
        self.vm = vm
        self.seconds = PlainHistogram(buckets)
        self.observe = self.seconds.observe  # (reason, seconds): one fault resolved

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.NAME, self.DOC, labels=["vm", "reason"])
        for reason in self.seconds.labels():
            buckets, total = self.seconds.cumulative(reason)
            family.add_metric([self.vm, str(reason)], buckets, total)
        yield family


class GuestCollector(Collector):
    """Counters and gauges read from the agent's state at scrape time."""

    def __init__(self, agent_ref: Callable[[], Agent | None]) -> None:
        self._agent_ref = agent_ref

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        agent = self._agent_ref()
        if agent is None:
            return
        vm = agent.config.name
        runner = agent.runner
        verified = CounterMetricFamily(
            "vmmem_guest_pages_verified",
            "Guest reads checked against the expected hash",
            labels=["vm"],
        )
        verified.add_metric([vm], agent.guest.verified)
        yield verified
        mism = CounterMetricFamily(
            "vmmem_guest_verify_mismatches",
            "Guest reads that did not match: data loss",
            labels=["vm"],
        )
        mism.add_metric([vm], agent.guest.mismatches)
        yield mism
        acc = CounterMetricFamily(
            "vmmem_guest_accesses", "Guest page accesses", labels=["vm", "kind"]
        )
        acc.add_metric([vm, "read"], runner.reads())
        acc.add_metric([vm, "write"], runner.writes())
        yield acc
        faults = CounterMetricFamily(
            "vmmem_guest_faults",
            "Faults the guest took, by platform reason",
            labels=["vm", "reason"],
        )
        for reason, n in list(agent.faults.by_reason.items()):
            faults.add_metric([vm, reason], n)
        yield faults
        exposed = GaugeMetricFamily(
            "vmmem_guest_exposed_pages", "Pages the VMM exposes to the guest", labels=["vm"]
        )
        exposed.add_metric([vm], agent.exposure.exposed_count())
        yield exposed
        touched = GaugeMetricFamily(
            "vmmem_guest_touched_pages", "Distinct pages the guest touched", labels=["vm"]
        )
        touched.add_metric([vm], runner.touched_count())
        yield touched
        soft = CounterMetricFamily(
            "vmmem_guest_soft_faults",
            "Touches the monitor resolved itself (a sampled page's hidden mapping given back)",
            labels=["vm"],
        )
        soft.add_metric([vm], agent.faults.soft_faults)
        yield soft
        sampler = agent.sampler
        sample = GaugeMetricFamily(
            "vmmem_vmm_sample_pages",
            "The current working-set sample: pages armed, and touched since armed",
            labels=["vm", "kind"],
        )
        sample.add_metric([vm, "armed"], sampler.armed)
        sample.add_metric([vm, "touched"], sampler.touched)
        yield sample
        work = CounterMetricFamily(
            "vmmem_vmm_monitor_work_pages",
            "Units of monitor-side low-priority work done, by task",
            labels=["vm", "task"],
        )
        cost = GaugeMetricFamily(
            "vmmem_vmm_monitor_cost_per_page_seconds",
            "Moving average of a monitor task's cost per unit of work",
            labels=["vm", "task"],
        )
        for name, c in agent.monitor.costs.items():
            work.add_metric([vm, name], c.units)
            cost.add_metric([vm, name], c.per_unit)
        yield work
        yield cost
        checker = agent.page_check
        checked = CounterMetricFamily(
            "vmmem_vmm_pages_checked",
            "Mapped pages the monitor re-verified against the guest model (page checking)",
            labels=["vm"],
        )
        checked.add_metric([vm], checker.checked)
        yield checked
        bad = CounterMetricFamily(
            "vmmem_vmm_page_check_mismatches",
            "Page checks that found a frame not holding what the guest wrote: data loss",
            labels=["vm"],
        )
        bad.add_metric([vm], checker.mismatches)
        yield bad
        yield from _guest_os_metrics(agent)


def _guest_os_metrics(agent: Agent) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    """The guest model's memory by kind, the page cache's refaults and the balloon."""
    vm, os, balloon = agent.config.name, agent.guest_os, agent.balloon
    pages = GaugeMetricFamily(
        "vmmem_guest_memory_pages",
        "Guest pages by what the guest uses them for (free, anon, cache, balloon)",
        labels=["vm", "kind"],
    )
    for kind, n in os.sizes().items():
        pages.add_metric([vm, kind], n)
    yield pages
    target = GaugeMetricFamily(
        "vmmem_guest_balloon_target_pages",
        "The balloon size the platform asks for (control region)",
        labels=["vm"],
    )
    target.add_metric([vm], balloon.target)
    yield target
    moved = CounterMetricFamily(
        "vmmem_guest_balloon_pages",
        "Pages into and out of the balloon: inflated (given to the platform), deflated "
        "(back to the free pool), returned (taken back by an anonymous access), remapped",
        labels=["vm", "direction"],
    )
    moved.add_metric([vm, "inflated"], balloon.inflated)
    moved.add_metric([vm, "deflated"], balloon.deflated)
    moved.add_metric([vm, "returned"], os.balloon_returns)
    moved.add_metric([vm, "remapped"], balloon.remapped)
    yield moved
    touches = CounterMetricFamily(
        "vmmem_guest_balloon_touches",
        "Guest accesses to a page while it was in the balloon (must stay 0)",
        labels=["vm"],
    )
    touches.add_metric([vm], os.balloon_touches)
    yield touches
    reads = CounterMetricFamily(
        "vmmem_guest_cache_reads",
        "Page-cache reads: hits, and refaults (the block had to be read from disk)",
        labels=["vm", "outcome"],
    )
    reads.add_metric([vm, "hit"], os.cache_hits)
    reads.add_metric([vm, "refault"], os.refaults)
    yield reads
    refault_time = CounterMetricFamily(
        "vmmem_guest_refault_seconds",
        "vCPU time spent waiting for refaults' simulated disk reads",
        labels=["vm"],
    )
    refault_time.add_metric([vm], os.refault_seconds)
    yield refault_time
    stall = CounterMetricFamily(
        "vmmem_guest_stall_seconds",
        "Time the guest made no progress: every running vCPU waiting (faults, disk reads), "
        "or exited for a low-priority round",
        labels=["vm"],
    )
    stall.add_metric([vm], agent.guest_progress.stalled_total(time.monotonic()))
    yield stall
