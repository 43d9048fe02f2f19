"""The hugepages scenario's run: coverage by 2 MB mappings over time, and the splits.

The daemon must run with ``--hugepages`` (2M promotion and 2M defrag); without it the
report says so and gives no figure. Three phases: the VMs write all their memory (every
region becomes fully backed and private, so 2M promotion collapses them one by one), then
run on reading and writing (coverage keeps growing), then the host limit is lowered below
what the VMs hold, so reclaim (balloon, swap) takes pages and splits the large regions
those pages are in. The daemon's status is sampled every quarter second: each VM's
coverage and splits over time. The limit is always put back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from shared.constants import PAGE_SIZE

from .driver import LoadRun

#: How often the run samples the daemon's status.
SAMPLE_PERIOD = 0.25
#: The pressure phase's host limit: what the VMs hold, less this fraction of their memory.
PRESSURE_FRACTION = 0.25


@dataclass
class HugepagesRecord:
    """What the run collected, for ``hugepages_report``."""

    enabled: bool = False
    limit_before: int | None = None
    limit_pressure: int | None = None
    pressure_at: float | None = None
    timeline: list[tuple[float, dict[str, tuple[float, int]]]] = field(default_factory=list)
    end: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


class HugepagesRun:
    """Runs the hugepages scenario on a prepared LoadRun."""

    def __init__(self, load: LoadRun) -> None:
        self.load = load
        self.record = HugepagesRecord()

    async def run(self) -> None:
        load, rec = self.load, self.record
        fill, steady, pressure = load.scenario.phases
        load.schedule_injections()
        t0 = time.monotonic()

        async def sample() -> None:
            self._sample(await load.daemon.call("status"), time.monotonic() - t0)

        try:
            status = await load.daemon.call("status")
            rec.enabled = bool(status and status.get("hugepages", {}).get("enabled"))
            if not rec.enabled:
                rec.notes.append("the daemon runs without --hugepages: nothing is promoted")
            # The timeline starts before the writes: with 16 MiB guests promotion can be
            # done before the first period's sample, and the growth would not show.
            self._sample(status, time.monotonic() - t0)
            for phase in (fill, steady):
                if not await load.run_phase(phase, every=sample, period=SAMPLE_PERIOD):
                    return
            await self._lower_limit()
            rec.pressure_at = round(time.monotonic() - t0, 3)
            await load.run_phase(pressure, every=sample, period=SAMPLE_PERIOD)
            rec.end = await load.daemon.call("status")
        finally:
            if rec.limit_before is not None:
                await load.daemon.call("set_host_limit", size=rec.limit_before * PAGE_SIZE)
            load.progress.done()
            load.out.extra["hugepages"] = hugepages_report(rec)

    async def _lower_limit(self) -> None:
        """Host limit below what the VMs hold: reclaim must take some of their pages."""
        rec, load = self.record, self.load
        status = await load.daemon.call("status")
        if status is None:
            return
        host = status["host"]
        guest = sum(int(vm["guest_pages"]) for vm in status["vms"])
        target = max(
            int(host["used"]) - int(PRESSURE_FRACTION * guest), int(host["min_limit_pages"])
        )
        if target >= int(host["limit_pages"]):
            rec.notes.append("no pressure phase: the host limit could not be lowered")
            return
        if await load.daemon.call("set_host_limit", size=target * PAGE_SIZE) is None:
            rec.notes.append("the daemon refused the lowered host limit")
            return
        rec.limit_before, rec.limit_pressure = int(host["limit_pages"]), target

    def _sample(self, status: dict[str, Any] | None, at: float) -> None:
        if status is None:
            return
        self.record.timeline.append(
            (
                round(at, 3),
                {
                    vm["name"]: (vm["hugepages"]["coverage"], vm["hugepages"]["splits"])
                    for vm in status["vms"]
                    if "hugepages" in vm
                },
            )
        )


def hugepages_report(rec: HugepagesRecord) -> dict[str, Any]:
    """Per VM: coverage over time, the highest and the last, splits before and under
    pressure, regions promoted; the host's free runs and defrag's work at the end."""
    names = sorted({n for _, by in rec.timeline for n in by})
    vms: dict[str, Any] = {}
    for name in names:
        points = [(t, by[name]) for t, by in rec.timeline if name in by]
        before = [s for t, (_, s) in points if rec.pressure_at is None or t < rec.pressure_at]
        vms[name] = {
            "coverage_max": max(c for _, (c, _) in points),
            "coverage_end": points[-1][1][0],
            "splits": points[-1][1][1],
            "splits_before_pressure": before[-1] if before else 0,
            "timeline": [[t, c, s] for t, (c, s) in points],
        }
    end = rec.end or {}
    for vm in end.get("vms", []):
        if vm["name"] in vms and "hugepages" in vm:
            vms[vm["name"]]["promoted_regions"] = vm["hugepages"]["promoted_regions"]
    return {
        "enabled": rec.enabled,
        "sample_period_seconds": SAMPLE_PERIOD,
        "pressure_at_seconds": rec.pressure_at,
        "host_limit_pages": [rec.limit_before, rec.limit_pressure],
        "host": end.get("hugepages"),
        "vms": vms,
        "notes": rec.notes,
    }


def hugepages_lines(section: dict[str, Any]) -> list[str]:
    """The report table's lines for the hugepages section."""
    lines = ["hugepages: coverage of guest memory by 2 MB mappings, and splits"]
    for name, vm in section["vms"].items():
        lines.append(
            f"  {name}: coverage max {vm['coverage_max']:.0%}, end {vm['coverage_end']:.0%}; "
            f"promoted {vm.get('promoted_regions', 0):,} regions; splits "
            f"{vm['splits_before_pressure']:,} before pressure, {vm['splits']:,} in all"
        )
        points = vm["timeline"][:: max(1, len(vm["timeline"]) // 10)]
        lines.append(
            "    coverage over time: " + "  ".join(f"{t:.1f}s {c:.0%}" for t, c, _ in points)
        )
    host = section.get("host") or {}
    if host:
        runs = ", ".join(f"node {n['node']} {n['free_runs']}" for n in host.get("nodes", []))
        d = host.get("defrag", {})
        lines.append(
            f"  free 2 MiB runs at the end: {runs}; defrag moved {d.get('moved', 0):,} pages, "
            f"freed {d.get('runs_freed', 0):,} runs"
        )
    lines.extend(f"  note: {n}" for n in section["notes"])
    return lines
