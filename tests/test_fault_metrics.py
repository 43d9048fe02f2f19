"""The fault metrics kept as plain numbers (platform_daemon/fault_metrics.py, and the agent's
fault latency in vmm_agent/metrics.py) export exactly what prometheus_client's own Counter and
Histogram would for the same faults."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from platform_daemon.fault_metrics import FaultMetrics
from platform_daemon.metrics import LATENCY_BUCKETS, PlatformMetrics
from shared.constants import FaultReason
from vmm_agent.metrics import LATENCY_BUCKETS as AGENT_BUCKETS
from vmm_agent.metrics import AgentMetrics, FaultLatency

REASONS = [r.name.lower() for r in FaultReason]
SECONDS = st.one_of(
    st.sampled_from([0.0, *LATENCY_BUCKETS, 2.0]),  # on a bound: it counts in that bucket
    st.floats(0, 3, allow_nan=False),
)


def exported(registry: CollectorRegistry) -> list[str]:
    """The exposition lines of the two fault metrics, without ``_created`` samples."""
    text = generate_latest(registry).decode()
    return sorted(
        line
        for line in text.splitlines()
        if line.startswith(("vmmem_platform_faults", "vmmem_platform_fault_service"))
        and "_created" not in line
        and not line.startswith("#")
    )


@settings(max_examples=60, deadline=None)
@given(faults=st.lists(st.tuples(st.sampled_from(range(len(REASONS))), SECONDS), max_size=40))
def test_same_exposition_as_prometheus_client(faults: list[tuple[int, float]]) -> None:
    ours = CollectorRegistry()
    metrics = FaultMetrics(REASONS, LATENCY_BUCKETS)
    ours.register(metrics)
    ref = CollectorRegistry()
    counter = Counter("vmmem_platform_faults", "x", ["reason"], registry=ref)
    histogram = Histogram(
        "vmmem_platform_fault_service_seconds", "x", ["reason"], buckets=LATENCY_BUCKETS,
        registry=ref,
    )  # fmt: skip
    for name in REASONS:  # the daemon's children exist from the start, at zero
        counter.labels(name)
        histogram.labels(name)
    for reason, seconds in faults:
        metrics.observe(reason, seconds)
        counter.labels(REASONS[reason]).inc()
        histogram.labels(REASONS[reason]).observe(seconds)
    assert exported(ours) == exported(ref)
    for reason in range(len(REASONS)):
        assert metrics.count(reason) == sum(1 for r, _ in faults if r == reason)


def test_platform_metrics_register_them() -> None:
    """The daemon's registry serves them under their documented names."""
    registry = CollectorRegistry()
    metrics = PlatformMetrics(registry)
    metrics.faults.observe(int(FaultReason.COW), 3e-5)
    assert registry.get_sample_value("vmmem_platform_faults_total", {"reason": "cow"}) == 1
    le = {"reason": "cow", "le": "5e-05"}
    assert registry.get_sample_value("vmmem_platform_fault_service_seconds_bucket", le) == 1
    le["le"] = "2.5e-05"
    assert registry.get_sample_value("vmmem_platform_fault_service_seconds_bucket", le) == 0


def agent_exported(registry: CollectorRegistry) -> list[str]:
    """The exposition lines of the agent's fault latency, without ``_created`` samples."""
    text = generate_latest(registry).decode()
    return sorted(
        line
        for line in text.splitlines()
        if FaultLatency.NAME in line and "_created" not in line  # HELP and TYPE too
    )


@settings(max_examples=60, deadline=None)
@given(
    faults=st.lists(
        st.tuples(st.sampled_from(REASONS), st.one_of(st.sampled_from(AGENT_BUCKETS), SECONDS)),
        max_size=40,
    )
)
def test_agent_fault_latency_same_exposition_as_prometheus_client(
    faults: list[tuple[str, float]],
) -> None:
    """The agent's fault latency (vmm_agent/metrics.py, plain numbers) exports what its
    former prometheus_client Histogram did: same buckets, counts and sums, and a reason
    appears only once it has a fault."""
    ours = CollectorRegistry()
    agent = AgentMetrics(ours, "vm7")
    ref = CollectorRegistry()
    histogram = Histogram(
        FaultLatency.NAME, FaultLatency.DOC, ["vm", "reason"], buckets=AGENT_BUCKETS,
        registry=ref,
    )  # fmt: skip
    for reason, seconds in faults:
        agent.observe_fault(reason, seconds)
        histogram.labels("vm7", reason).observe(seconds)
    assert agent_exported(ours) == agent_exported(ref)
