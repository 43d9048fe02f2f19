"""The fault path's two metrics, kept as plain numbers and exported at scrape time.

``vmmem_platform_faults_total{reason}`` and ``vmmem_platform_fault_service_seconds{reason}``
are updated once per fault. With prometheus_client's Counter and Histogram that is an ``inc``
and an ``observe`` on labelled children: about 2.5 µs per fault (a lock and a ``Value`` per
bucket, observability checks), a tenth of the daemon's whole CPU per fault once the rest of
the path was made scalar (issue 10). Here a fault costs one ``bisect`` and two list updates;
the scrape builds the same families (cumulative buckets, ``_count``, ``_sum``) from them.

Reads from the scrape thread see each number whole (the GIL); a scrape that races a fault
may see its count and not yet its sum, as with prometheus_client's own metrics.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.plain_histogram import PlainHistogram


class FaultMetrics(Collector):
    """Faults answered and their service time, by reason (a FaultReason value)."""

    def __init__(self, reasons: Sequence[str], buckets: Sequence[float]) -> None:
        self.reasons = list(reasons)
        #: Keyed by the reason's value; every reason exported from the start.
        self.seconds = PlainHistogram(buckets, range(len(self.reasons)))
        self.observe = self.seconds.observe  # (reason, seconds): one fault answered

    def count(self, reason: int) -> int:
        return self.seconds.count(reason)

    def collect(self) -> Iterator[Metric]:
        faults = CounterMetricFamily(
            "vmmem_platform_faults", "Faults resolved by the platform", labels=["reason"]
        )
        seconds = HistogramMetricFamily(
            "vmmem_platform_fault_service_seconds",
            "Time the platform spent resolving one fault (receipt to reply)",
            labels=["reason"],
        )
        for i, name in enumerate(self.reasons):
            buckets, total = self.seconds.cumulative(i)
            faults.add_metric([name], buckets[-1][1])
            seconds.add_metric([name], buckets, total)
        yield faults
        yield seconds
