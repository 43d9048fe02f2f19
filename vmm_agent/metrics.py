"""Prometheus metrics of one VMM agent (label ``vm``: one value per process, bounded)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .agent import Agent

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


class AgentMetrics:
    """Metrics updated on the agent's paths."""

    def __init__(self, registry: CollectorRegistry, vm: str) -> None:
        self.registry = registry
        self.vm = vm
        self.fault_seconds = Histogram(
            "vmmem_guest_fault_latency_seconds",
            "Guest-visible fault latency: fault sent to mapping installed",
            ["vm", "reason"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "vmmem_vmm_batch_seconds",
            "VMM time to filter and invalidate one batch",
            ["vm", "service"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._fault_children: dict[str, Any] = {}
        self.batch_pages = Counter(
            "vmmem_vmm_batch_pages",
            "Pages the VMM accepted or refused, by reason",
            ["vm", "service", "status"],
            registry=registry,
        )

    def observe_fault(self, reason: str, seconds: float) -> None:
        child = self._fault_children.get(reason)
        if child is None:  # labels() costs microseconds: bind each reason once
            child = self._fault_children[reason] = self.fault_seconds.labels(self.vm, reason)
        child.observe(seconds)


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
