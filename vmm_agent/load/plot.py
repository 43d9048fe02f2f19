"""``vmmem-load --plot FILE.png``: the run's samples (samples.py) drawn over time.

Three panels sharing the time axis: each VM's resident, swapped and shared pages (a colour
per VM, a line style per figure); the host's free frames; each VM's fault latency p50 and
p99 (log scale). Dotted vertical lines mark where each phase ends. matplotlib runs with the
Agg backend (no display needed), imported only when a plot is asked for.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

#: Line style of each page figure, in the first panel.
PAGE_STYLES = {"resident_pages": "-", "swapped_pages": "--", "shared_pages": ":"}


def _series(samples: list[dict[str, Any]], vm: str, key: str) -> tuple[list[float], list[float]]:
    """Times and values of ``key`` for ``vm``, skipping samples where it is unknown."""
    ts, vs = [], []
    for s in samples:
        value = s["vms"].get(vm, {}).get(key)
        if value is not None:
            ts.append(s["seconds"])
            vs.append(float(value))
    return ts, vs


def _phase_ends(samples: list[dict[str, Any]]) -> list[tuple[float, str]]:
    ends = []
    for before, after in itertools.pairwise(samples):
        if before["phase"] != after["phase"]:
            ends.append((before["seconds"], before["phase"]))
    return ends


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Draw ``report["samples"]`` into the PNG file ``path`` (OSError if it cannot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples: list[dict[str, Any]] = report.get("samples", [])
    vms = sorted({name for s in samples for name in s["vms"]})
    fig, (pages, host, lat) = plt.subplots(3, 1, sharex=True, figsize=(10, 9))
    try:
        fig.suptitle(f"vmmem-load: scenario {report['scenario']} — {report['verdict']}")
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, vm in enumerate(vms):
            colour = colours[i % len(colours)]
            for key, style in PAGE_STYLES.items():
                label = f"{vm} {key.removesuffix('_pages')}"
                pages.plot(*_series(samples, vm, key), style, color=colour, label=label)
            for key, style in (("fault_p50_seconds", "-"), ("fault_p99_seconds", "--")):
                ts, vs = _series(samples, vm, key)
                label = f"{vm} {key.split('_')[1]}"
                lat.plot(ts, [v * 1e3 for v in vs], style, color=colour, label=label)
        free = [
            (s["seconds"], s["host_free_pages"])
            for s in samples
            if s["host_free_pages"] is not None
        ]
        host.plot([t for t, _ in free], [f for _, f in free], color="black", label="free frames")
        pages.set_ylabel("pages")
        pages.set_title("resident (—), swapped (- -), shared (···) pages per VM", fontsize=9)
        host.set_ylabel("host free frames")
        lat.set_ylabel("fault latency, ms")
        lat.set_title("fault latency p50 (—) and p99 (- -) per VM", fontsize=9)
        if any(line.get_ydata().size and max(line.get_ydata()) > 0 for line in lat.lines):
            lat.set_yscale("log")
        lat.set_xlabel("seconds into the run")
        for ax in (pages, host, lat):
            for t, _ in _phase_ends(samples):
                ax.axvline(t, color="grey", linestyle=":", linewidth=0.8)
            if ax.lines:
                ax.legend(fontsize=7, ncol=3, loc="upper left")
            ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=80)
    finally:
        plt.close(fig)
