"""Report sections of the low-priority scenarios: sharing, latency and sampling.

Each function turns what the load generator collected (per-phase snapshots of the agents'
results and of the daemon's status, the agents' round records, the daemon's sampling
history) into the figures the scenario is about, computed from the guest model's own truth.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class PhaseWindow:
    """When a phase ran, on the host's monotonic clock (the same in every process)."""

    name: str
    start: float
    end: float

    def holds(self, start: float, end: float) -> bool:
        """Whether the window [start, end] lies wholly inside this phase."""
        return self.start <= start and end <= self.end


Page = dict[str, Any]


async def rounds_in(
    ask: Callable[[float], Awaitable[Page | None]], start: float, end: float
) -> Page | None:
    """An agent's low-priority summary with its rounds that started in ``start..end``
    (monotonic), asked a reply's page at a time: ``ask(after)`` is its ctl op ``lowprio``
    with ``after``. None when ``ask`` gives None (the VM left)."""
    rounds: list[Page] = []
    after = start - 1e-9
    while True:
        page = await ask(after)
        if page is None:
            return None
        got = page["rounds"]
        rounds += [r for r in got if r["started"] <= end]
        if not page["more"] or not got or got[-1]["started"] > end:
            return {**page, "rounds": rounds}
        after = got[-1]["started"]


def shareable(contents: list[dict[str, Any]]) -> dict[str, int]:
    """Pages page sharing could merge, from the guests' content profiles.

    A zero page can always merge (into a zero frame). A page holding a corpus page can merge
    when at least two pages, in any VMs, hold that corpus page. Unique pages never can. The
    frames that would be saved are one per mergeable page, less one frame per corpus page
    kept.
    """
    zero = sum(c["zero"] for c in contents)
    per_corpus = np.sum([c["corpus"] for c in contents], axis=0) if contents else np.zeros(0)
    dup = per_corpus[per_corpus >= 2]
    return {
        "shareable_pages": int(zero + dup.sum()),
        "saveable_frames": int(zero + (dup - 1).sum()),
    }


def sharing_report(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """Shareable against shared after the merge phase; COW breaks over the run."""
    by_phase = {s["phase"]: s for s in snapshots}
    merged = by_phase.get("merge", snapshots[-1])
    last = snapshots[-1]
    truth = shareable([r["content"] for r in merged["results"].values()])
    sharing = merged["status"]["sharing"]
    vms = {vm["name"]: vm["sharing"] for vm in last["status"]["vms"]}
    found = sharing["shared_pages"] / truth["shareable_pages"] if truth["shareable_pages"] else 0.0
    return {
        **truth,
        "shared_pages": sharing["shared_pages"],
        "frames_saved": sharing["frames_saved"],
        "found_fraction": round(found, 4),
        "cow_breaks": sum(v["cow_breaks"] for v in vms.values()),
        "after_cow": last["status"]["sharing"],
        "vms": vms,
    }


def latency_report(summaries: dict[str, dict[str, Any]], window: PhaseWindow) -> dict[str, Any]:
    """Each VM's low-priority time per second against its bound, and overruns."""
    vms: dict[str, Any] = {}
    ratios: list[float] = []
    seconds = max(window.end - window.start, 1e-9)
    for name, summary in summaries.items():
        rounds = [r for r in summary["rounds"] if window.start <= r["started"] <= window.end]
        used = sum(r["used"] for r in rounds)
        bound = summary["bound_seconds"]
        overruns = [r["overrun"] / r["bound"] for r in rounds if r["bound"] > 0]
        ratios.extend(overruns)
        vms[name] = {
            "latency_sensitivity": summary["latency_sensitivity"],
            "bound_seconds": bound,
            "rounds": len(rounds),
            "time_used_per_second": round(used / seconds, 6),
            # 10 ticks a second: the most the bound allows per second.
            "bound_per_second": round(bound * 10, 6),
            "mean_round_seconds": round(used / len(rounds), 6) if rounds else 0.0,
            "overrun_p99_fraction": _p99(overruns),
            "outcomes": _count(r["outcome"] for r in rounds),
        }
    return {"overrun_p99_fraction": _p99(ratios), "rounds": len(ratios), "vms": vms}


def sampling_report(
    history: dict[str, list[dict[str, Any]]],
    truths: dict[str, dict[str, float]],
    phases: list[PhaseWindow],
    truth_windows: dict[str, dict[str, list[float]]],
    converge_periods: int = 3,
    unscored: Collection[str] = ("fill",),
) -> dict[str, Any]:
    """The estimate against the true working set, per phase and VM (fractions of memory).

    A period counts for a phase when it lies wholly inside it: the platform's period (where
    the estimate was measured) and the window the monitor counted its truth in, which ends
    only when the next sample reaches the monitor, maybe after the phase did. A period whose
    truth window leaks out of its phase is compared with nothing (its truth mixes two
    working sets) and counted in ``truth_outside_phase``. ``max_abs_error`` is over the
    periods after the first ``converge_periods`` of each phase (the estimate is an average:
    it needs a few periods to follow a change); ``max_abs_error_all`` is over every period.
    Phases named in ``unscored`` (the scenario's fill) are left out.
    """
    out_phases: dict[str, Any] = {}
    worst, worst_all = 0.0, 0.0
    for phase in phases:
        if phase.name in unscored:
            continue
        per_vm: dict[str, Any] = {}
        for vm, periods in history.items():
            truth = truths.get(vm, {})
            windows = truth_windows.get(vm, {})
            measured = [
                p
                for p in periods
                if phase.holds(p["started"], p["ended"])
                and p["estimate"] is not None
                and str(p["sample_id"]) in truth
            ]
            rows = [
                (p, truth[str(p["sample_id"])])
                for p in measured
                if phase.holds(*windows.get(str(p["sample_id"]), (-1.0, -1.0)))
            ]
            errors = [abs(p["estimate"] - t) for p, t in rows]
            raw = [abs(p["touched"] / p["armed"] - t) for p, t in rows if p["armed"]]
            settled = errors[converge_periods:]
            per_vm[vm] = {
                "periods": len(rows),
                "truth_outside_phase": len(measured) - len(rows),
                "truth": [round(t, 4) for _, t in rows],
                "estimate": [round(p["estimate"], 4) for p, _ in rows],
                # The period's own sample (touched / armed), before smoothing, and how many
                # of its pages the monitor had armed when the period ended.
                "armed": [p["armed"] for p, _ in rows],
                "sampled": [
                    round(p["touched"] / p["armed"], 4) if p["armed"] else None for p, _ in rows
                ],
                "max_abs_error": round(max(settled), 4) if settled else None,
                "max_abs_error_all": round(max(errors), 4) if errors else None,
                "max_abs_error_raw_sample": round(max(raw), 4) if raw else None,
            }
            worst = max([worst, *settled])
            worst_all = max([worst_all, *errors])
        out_phases[phase.name] = per_vm
    return {
        "max_abs_error": round(worst, 4),
        "max_abs_error_all": round(worst_all, 4),
        "phases": out_phases,
    }


def _p99(values: list[float]) -> float:
    return round(float(np.quantile(values, 0.99)), 4) if values else 0.0


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out
