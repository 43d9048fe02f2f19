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

import math
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class FaultMetrics(Collector):
    """Faults answered and their service time, by reason (a FaultReason value)."""

    def __init__(self, reasons: Sequence[str], buckets: Sequence[float]) -> None:
        self.reasons = list(reasons)
        self.bounds = [*buckets, math.inf]
        # The ``le`` labels exactly as prometheus_client's own Histogram writes them.
        self._les = [floatToGoString(b) for b in self.bounds]  # type: ignore[no-untyped-call]
        #: Per reason, faults per bucket (not cumulative: one increment per fault).
        self.counts = [[0] * len(self.bounds) for _ in self.reasons]
        self.sums = [0.0] * len(self.reasons)

    def observe(self, reason: int, seconds: float) -> None:
        """One fault of ``reason`` answered in ``seconds``."""
        self.counts[reason][bisect_left(self.bounds, seconds)] += 1
        self.sums[reason] += seconds

    def count(self, reason: int) -> int:
        return sum(self.counts[reason])

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
            per_bucket, total = list(self.counts[i]), self.sums[i]
            cumulative, buckets = 0, []
            for le, n in zip(self._les, per_bucket, strict=True):
                cumulative += n
                buckets.append((le, float(cumulative)))
            faults.add_metric([name], float(cumulative))
            seconds.add_metric([name], buckets, total)
        yield faults
        yield seconds
