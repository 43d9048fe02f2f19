"""The load generator's report: one table for people, one JSON document for programs."""

from __future__ import annotations

from collections import Counter
from typing import Any


def build_report(
    scenario: str,
    seconds: float,
    results: dict[str, dict[str, Any]],
    verify: dict[str, dict[str, Any]],
    status: dict[str, Any],
    injected: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Combine the agents' results, their verification passes and the daemon's status."""
    vms: dict[str, Any] = {}
    faults: Counter[str] = Counter()
    daemon_vms = {vm["name"]: vm for vm in status.get("vms", [])}
    for name, res in results.items():
        ver = verify[name]
        stats = daemon_vms.get(name, {}).get("stats", {})
        faults.update(res["faults_by_reason"])
        vms[name] = {
            "pages_touched": res["touched"],
            "pages_written": res["pages_written"],
            "reads": res["reads"],
            "writes": res["writes"],
            "faults": res["faults"],
            "faults_by_reason": res["faults_by_reason"],
            "fault_errors": res["fault_errors"],
            "fault_latency_seconds": res["fault_latency_seconds"],
            "swap": {
                "pages_out": stats.get("swapped_out", 0),
                "pages_in": stats.get("swapped_in", 0),
                "cancelled": stats.get("swap_cancelled", 0),
            },
            "retired_moves": stats.get("retired_moves", 0),
            "sharing": daemon_vms.get(name, {}).get("sharing", {}),
            "working_set": daemon_vms.get(name, {}).get("sampling", {}),
            "lowprio": res.get("lowprio", {}),
            "batches": res["batches"],
            "batch_pages": res["batch_pages"],
            "released_while_pinned": res["released_while_pinned"],
            "pin_violations": res["pin_violations"],
            "pin_cycles": res["pin_cycles"],
            "verification": {
                "pages_verified": ver["pages_verified"],
                # Every guest read is checked: count mismatches of the run and of the pass.
                "mismatches": max(ver["mismatches"], res["verification"]["mismatches"]),
                "unreachable": ver["unreachable"],
                "reads_checked_during_run": res["verification"]["pages_verified"],
            },
        }
    total = {
        key: sum(v["verification"][key] for v in vms.values())
        for key in ("pages_verified", "mismatches", "unreachable")
    }
    swap = {
        k: sum(v["swap"][k] for v in vms.values()) for k in ("pages_out", "pages_in", "cancelled")
    }
    host = status.get("host", {})
    return {
        "scenario": scenario,
        "seconds": round(seconds, 3),
        "verification": total,
        "swap": swap,
        "faults": dict(faults),
        "retired_frames": host.get("retired", 0),
        "injected_failures": injected,
        "host": host,
        **(extra or {}),
        "vms": vms,
        "ok": total["mismatches"] == 0
        and total["unreachable"] == 0
        and all(
            v["pin_violations"] == 0 and not v["released_while_pinned"].get("swap")
            for v in vms.values()
        ),
    }


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f}"


def render_table(report: dict[str, Any]) -> str:
    """A fixed-width table, one row per VM, then the totals."""
    head = (
        f"{'VM':<10}{'touched':>9}{'written':>9}{'faults':>9}{'p50 µs':>9}{'p99 µs':>9}"
        f"{'swap out':>10}{'swap in':>9}{'cancel':>8}{'verified':>10}{'mismatch':>9}"
    )
    lines = [f"scenario {report['scenario']}, {report['seconds']:.1f} s", head, "-" * len(head)]
    for name, v in sorted(report["vms"].items()):
        lat = v["fault_latency_seconds"]
        lines.append(
            f"{name:<10}{v['pages_touched']:>9,}{v['pages_written']:>9,}{v['faults']:>9,}"
            f"{_us(lat['p50']):>9}{_us(lat['p99']):>9}{v['swap']['pages_out']:>10,}"
            f"{v['swap']['pages_in']:>9,}{v['swap']['cancelled']:>8,}"
            f"{v['verification']['pages_verified']:>10,}{v['verification']['mismatches']:>9,}"
        )
    t = report["verification"]
    lines.append("-" * len(head))
    faults = ", ".join(f"{k} {n:,}" for k, n in sorted(report["faults"].items()))
    lines.append(f"faults by reason: {faults or 'none'}")
    s = report["swap"]
    lines.append(
        f"swap: {s['pages_out']:,} out, {s['pages_in']:,} in, {s['cancelled']:,} "
        f"cancelled; retired frames: {report['retired_frames']}"
    )
    lines.extend(_lowprio_lines(report))
    verdict = "OK: every page verified" if report["ok"] else "FAILED: data loss or violation"
    lines.append(
        f"verification: {t['pages_verified']:,} pages, {t['mismatches']} mismatches, "
        f"{t['unreachable']} unreachable — {verdict}"
    )
    return "\n".join(lines)


def _lowprio_lines(report: dict[str, Any]) -> list[str]:
    """The low-priority scenarios' own figures, when the report has them."""
    lines = []
    if "sharing" in report:
        sh = report["sharing"]
        lines.append(
            f"sharing: {sh['shared_pages']:,} of {sh['shareable_pages']:,} shareable pages "
            f"shared ({sh['found_fraction']:.1%}), {sh['frames_saved']:,} frames saved "
            f"(of {sh['saveable_frames']:,} saveable), {sh['cow_breaks']:,} COW breaks"
        )
    if "lowprio" in report:
        lp = report["lowprio"]
        for name, v in sorted(lp["vms"].items()):
            lines.append(
                f"lowprio {name}: sensitivity {v['latency_sensitivity']}, bound "
                f"{v['bound_seconds'] * 1e3:.2f} ms, used {v['time_used_per_second'] * 1e3:.2f}"
                f" ms/s of {v['bound_per_second'] * 1e3:.1f}, overrun p99 "
                f"{v['overrun_p99_fraction']:.1%} of the bound"
            )
        lines.append(f"lowprio overrun p99: {lp['overrun_p99_fraction']:.1%} of the bound")
    if "sampling" in report:
        sa = report["sampling"]
        lines.append(
            f"sampling: max |estimate - truth| {sa['max_abs_error']:.1%} of guest memory "
            f"after 3 periods ({sa['max_abs_error_all']:.1%} over all periods)"
        )
    return lines
